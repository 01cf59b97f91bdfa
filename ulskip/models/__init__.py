from ulskip.models.bloom import BloomLM
from ulskip.models.llama import LlamaLM

MODEL_CLASSES = {"llama": LlamaLM, "bloom": BloomLM}
