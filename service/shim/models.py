"""Request bodies of the REST shim as pydantic models: they validate types (a wrong type is a 400
naming the field), document the API in the served OpenAPI document, and drive the fuzz tests.

Unknown fields are accepted and ignored, as OpenAI's and Ollama's clients add fields over time;
known fields Weft cannot honour (images, `suffix`, ...) are refused by the shim with a 400
naming them rather than silently ignored.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JsonSchema = dict[str, Any]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ---- OpenAI -----------------------------------------------------------------------------------


class ContentPart(_Body):
    type: str = Field(description='Only "text" parts are supported.')
    text: str | None = None


class ChatMessage(_Body):
    role: str = Field(description='"system", "developer" (read as system), "user", "assistant", "tool" or '
                                  '"function" (legacy).')
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(default=None, description="An assistant turn's calls.")
    tool_call_id: str | None = Field(default=None, description="A tool turn: the call it answers.")
    function_call: dict[str, Any] | None = Field(default=None, description="Legacy: an assistant turn's call.")


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: JsonSchema | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's structured outputs: set exactly one member."""
    json_: JsonSchema | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class SamplingFields(_Body):
    model: str | None = Field(default=None, description="The served model's name; empty or unset means it.")
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_close_before_max_tokens: bool | None = Field(
        default=None, description="Weft: close the guided output before max_tokens would cut it (default true).")
    cache_salt: str | None = None
    return_token_ids: bool | None = Field(default=None, description="Add `token_ids` to each choice (vLLM).")
    num_speculative_tokens: int | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, description='[{"type": "function", "function": '
                                                                         '{name, description, parameters, strict}}]')
    tool_choice: str | dict[str, Any] | None = Field(default=None, description='"none", "auto" (default with '
                                                     'tools), "required" or {"type": "function", "function": {name}}')
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(default=None, description="Legacy tools: [{name, description, "
                                                                             "parameters}]")
    function_call: str | dict[str, Any] | None = Field(default=None, description='Legacy tool_choice: "none", '
                                                       '"auto" or {name}')
    add_generation_prompt: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ResponsesRequest(_Body):
    """OpenAI's Responses API (POST /v1/responses)."""
    model: str | None = Field(default=None, description="The served model's name; empty or unset means it.")
    input: str | list[dict[str, Any]] = Field(description="Text, or input items: messages (text parts), "
                                              "function_call and function_call_output items.")
    instructions: str | None = Field(default=None, description="A system message put first (not carried over "
                                                               "by previous_response_id).")
    previous_response_id: str | None = Field(default=None, description="Continue a stored response's "
                                                                       "conversation.")
    store: bool | None = Field(default=None, description="Keep the response for previous_response_id and GET "
                                                         "(default true; in memory, bounded, expiring).")
    tools: list[dict[str, Any]] | None = Field(default=None, description='[{"type": "function", name, description, '
                                                                         'parameters, strict}]')
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = Field(default=None, description='{"format": {"type": "text" | "json_object" | '
                                                                  '"json_schema", name, schema, strict}}')
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    stream: bool | None = False
    truncation: str | None = None
    metadata: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    user: str | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


class LoadLoraAdapterRequest(_Body):
    """vLLM's /v1/load_lora_adapter."""
    lora_name: str = Field(description="The model name requests will use.")
    lora_path: str = Field(description="A PEFT adapter directory or a LoRA .gguf file on the server.")


class UnloadLoraAdapterRequest(_Body):
    lora_name: str


class TokenizeRequest(_Body):
    """vLLM's /tokenize: `prompt` text, or `messages` rendered with the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---- Ollama -----------------------------------------------------------------------------------


class OllamaOptions(_Body):
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | str | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class OllamaGenerateRequest(_Body):
    model: str | None = ""
    prompt: str | None = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool | None = True
    raw: bool | None = False
    format: str | JsonSchema | None = None
    options: OllamaOptions | None = None
    images: list[str] | None = None
    keep_alive: str | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaMessage(_Body):
    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None    # a tool turn: which tool answered


class OllamaChatRequest(_Body):
    model: str | None = ""
    messages: list[OllamaMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    format: str | JsonSchema | None = None
    options: OllamaOptions | None = None
    stream: bool | None = True
    keep_alive: str | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaShowRequest(_Body):
    model: str | None = None
    name: str | None = None     # older clients
    verbose: bool | None = None


class OllamaCreateRequest(_Body):
    """Ollama's /api/create, as the current `ollama` client sends it (Modelfile fields as JSON)."""
    model: str | None = None
    name: str | None = None     # older clients
    from_: str | None = Field(default=None, alias="from", description="A store name or a path on the server.")
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    adapters: dict[str, str] | None = Field(default=None, description="LoRA adapters: name -> directory on the "
                                                                      "server.")
    license: str | list[str] | None = None
    files: dict[str, str] | None = None
    quantize: str | None = None
    modelfile: str | None = Field(default=None, description="Older clients: the Modelfile text.")
    stream: bool | None = True


class OllamaDeleteRequest(_Body):
    model: str | None = None
    name: str | None = None


class OllamaCopyRequest(_Body):
    source: str
    destination: str


class OllamaPullRequest(_Body):
    """Ollama's /api/pull: `model` is where to pull from (here: a path or package on the server)."""
    model: str | None = None
    name: str | None = None     # older clients
    insecure: bool | None = None
    stream: bool | None = True


# ---- embeddings -------------------------------------------------------------------------------


class EmbeddingRequest(_Body):
    """OpenAI's /v1/embeddings."""
    model: str | None = Field(default=None, description="e.g. all-minilm; empty or unset: the first served model.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, texts, token ids, or lists of token ids (at most 2048 inputs).")
    encoding_format: Literal["float", "base64"] | None = Field(
        default="float", description="base64: each vector as little-endian float32 bytes, base64-encoded.")
    dimensions: int | None = Field(default=None, description="Keep the first N components (re-normalised).")
    user: str | None = None


class OllamaEmbedRequest(_Body):
    """Ollama's /api/embed."""
    model: str | None = ""
    input: str | list[str] | None = None
    truncate: bool | None = Field(default=True, description="Cut inputs longer than the model takes (Ollama's "
                                                            "default); false: 400 naming the input.")
    dimensions: int | None = None
    keep_alive: str | float | None = None
    options: dict[str, Any] | None = None


class OllamaEmbeddingsRequest(_Body):
    """Ollama's older /api/embeddings: one prompt, one vector."""
    model: str | None = ""
    prompt: str | None = None
    keep_alive: str | float | None = None
    options: dict[str, Any] | None = None
