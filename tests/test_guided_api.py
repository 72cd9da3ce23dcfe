"""GuidedDecoding.close_before_max_tokens through the API layers: the proto field (unset means
true), the gRPC server's GuidedSpec, the REST shim's `guided_close_before_max_tokens`."""
from __future__ import annotations

from clients.weft.v1 import guided_pb2
from clients.weft.v1 import inference_pb2 as pb
from service.server import guided_spec
from service.shim.models import ChatCompletionRequest
from service.shim.translate import RequestBuilder, apply_sampling

CHAT = [{"role": "user", "content": "hi"}]
KINDS = {
    "json_schema": dict(json_schema='{"type": "object"}'),
    "regex": dict(regex="[a-z]+"),
    "choice": dict(choice=guided_pb2.ChoiceList(choices=["a", "b"])),
    "grammar": dict(grammar=guided_pb2.Grammar(definition='start: "a"')),
    "json_object": dict(json_object=guided_pb2.JsonObject()),
}


def test_proto_field_unset_means_true_for_every_kind() -> None:
    for kind, fields in KINDS.items():
        for value, want in ((None, True), (True, True), (False, False)):
            g = guided_pb2.GuidedDecoding(**fields)
            if value is not None:
                g.close_before_max_tokens = value
            spec = guided_spec(pb.GenerateRequest(text="x", guided=g))
            assert spec.kind == kind and spec.close_before_max_tokens is want, (kind, value)
    assert guided_spec(pb.GenerateRequest(text="x")) is None


def _build(**fields) -> RequestBuilder:
    b = RequestBuilder()
    apply_sampling(b, ChatCompletionRequest.model_validate({"messages": CHAT, **fields}))
    return b


def test_rest_shim_maps_guided_close_before_max_tokens() -> None:
    schema = {"type": "object"}
    b = _build(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
               guided_close_before_max_tokens=False)
    assert b.req.guided.HasField("close_before_max_tokens") and not b.req.guided.close_before_max_tokens
    assert b.param_of("guided.close_before_max_tokens") == "guided_close_before_max_tokens"
    assert guided_spec(b.req).close_before_max_tokens is False
    b = _build(guided_regex="[a-z]+")
    assert not b.req.guided.HasField("close_before_max_tokens")
    assert guided_spec(b.req).close_before_max_tokens is True
    # Without a guided spec the field changes nothing (no empty GuidedDecoding is sent).
    assert not _build(guided_close_before_max_tokens=False).req.HasField("guided")
