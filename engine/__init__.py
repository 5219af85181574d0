"""vlmserve's inference engine: ``from engine import LLM, SamplingParams``."""

from engine.config import EngineArgs
from engine.llm import LLM
from engine.outputs import CompletionOutput, EmbeddingOutput, Logprob, PoolingRequestOutput, RequestOutput
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "PoolingParams", "EngineArgs", "RequestOutput", "CompletionOutput", "Logprob",
           "PoolingRequestOutput", "EmbeddingOutput", "AsyncLLM"]


def __getattr__(name: str):
    # The async engine pulls in multiprocessing machinery; import it only when asked for.
    if name == "AsyncLLM":
        from engine.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
