"""What every layer may import: the error types that cross layers and the environment knobs.
Nothing here imports another Weft package, so kernels/, decoding/ and service/ all sit above it."""
