"""Model -> tokens: the compact KV cache, CUDA graphs, the engine's prefill/decode loop, sampling, beam search."""
