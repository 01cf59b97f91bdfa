"""Tokens -> quality: a checkpoint decoded by the engine under its schedule, scored against references
(BLEU and chrF with sacrebleu, perplexity of the references with the exact ULS semantics)."""
