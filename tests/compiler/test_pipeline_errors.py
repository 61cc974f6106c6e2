"""A pass that crashes: the pipeline raises InternalError naming the pass, with the first
line of the error only (a C++ error's native frames would push the Python traceback out of
a search trial's record) and the original exception as its cause."""

from dataclasses import dataclass

import pytest
import torch

from optc.compiler import passes, pipeline
from optc.compiler.config import PassConfig, knob
from optc.errors import InternalError


@dataclass(frozen=True)
class CrashConfig(PassConfig):
    level: int = knob(0, low=0, high=10)

    def active(self):
        return self.enabled and self.level > 0


@pytest.fixture
def crashing_pipeline():
    passes.load_all()
    if "crashing_pass" not in passes.REGISTRY:
        @passes.register_pass("crashing_pass", CrashConfig, lossy=False)
        def crashing_pass(gm, anatomy, cfg, plan):
            """Fails the way a C++ kernel does: a message, then native frames."""
            raise RuntimeError("Cannot call numel() on tensor with symbolic sizes/strides\n"
                               "frame #0: c10::Error::Error(...)\nframe #1: at::native::matmul(...)")
    pipeline.PIPELINES["crash"] = [pipeline.Step("crashing_pass", "exists for the test")]
    yield
    pipeline.PIPELINES.pop("crash")
    passes.REGISTRY.pop("crashing_pass")  # other tests list the known passes


def test_a_crashing_pass_is_an_internal_error_with_one_line_and_its_cause(crashing_pipeline):
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    config = pipeline.resolve("crash", {"crashing_pass": {"level": 1}})
    with pytest.raises(InternalError) as info:
        pipeline.run({"forward": gm}, "forward", config, make_context=lambda g: None, log=lambda m: None)
    message = str(info.value)
    assert message == ("pass crashing_pass failed after []: RuntimeError: Cannot call numel() on tensor with "
                       "symbolic sizes/strides")
    assert isinstance(info.value.__cause__, RuntimeError) and "frame #1" in str(info.value.__cause__)
