"""A model with steps, run as one: pre step, the model, post step, behind the same `run(wanted, feed)` as
the plain runner (worker/session.py), so both paths into a worker (the supervisor's tasks, clients' direct
requests) and the deadline watch around a run treat it like any model. A step that raises becomes a
StepFailed naming the step (contract.py); what a step returns is checked against what it declared before
it goes anywhere."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from openinfer.daemon.worker.compute import for_onnxruntime
from openinfer.daemon.worker.session import Runner, error_code_for
from openinfer.wire.tensors import DATATYPE_TO_NUMPY, BF16Array, bytes_element

from .contract import INTERNAL, INVALID_ARGUMENT, MAX_MODEL_CALLS, RESOURCE_EXHAUSTED, Answer, StepFailed, step_failed
from .loader import LoadedSteps


@dataclass
class Stage:
    """One model a step calls: the plain runner of its session and what the model takes and gives."""

    runner: Any
    inputs: dict[str, str]  # name -> datatype
    outputs: list[str]

    @classmethod
    def of(cls, runner: Any, model: dict[str, list[dict[str, Any]]]) -> "Stage":
        return cls(runner, {spec["name"]: spec["datatype"] for spec in model["inputs"]}, [spec["name"] for spec in model["outputs"]])


class StepRunner:
    """`stages`: the model (one stage, named "") or a chain's members by name, in the chain's order."""

    def __init__(self, stages: dict[str, Stage], steps: LoadedSteps, clients: dict[str, list[dict[str, Any]]]) -> None:
        self.stages = stages
        self.chain = "" not in stages
        self.steps = steps
        self.raw_inputs = steps.pre is not None or steps.drive is not None  # the step gets BYTES as the client's bytes
        self.client_outputs = {spec["name"]: spec for spec in clients["outputs"]}
        self.dynamic_inputs = frozenset(spec["name"] for spec in clients["inputs"] if any(d < 0 for d in spec["shape"]))
        self.last_stages: dict[str, dict[str, Any]] | None = None  # a chain's last run: per member, runs and compute_us

    @staticmethod
    def new_run_options() -> Any:
        return Runner.new_run_options()

    def run(self, wanted: list[str], feed: dict[str, Any], run_options: Any = None) -> list[Any]:
        steps = self.steps
        outputs: dict[str, Any]
        if steps.drive is not None:
            return self._driven(wanted, feed, run_options)
        model = self.stages[""]
        if steps.pre is not None:
            try:
                prepared = steps.pre(feed)
            except Exception as exc:
                raise step_failed("pre", steps.module, exc) from None
            if isinstance(prepared, Answer):
                return self._client_values(wanted, prepared, "pre")
            results = self._run_model(model, "", self._model_feed(model, "", prepared), run_options, "pre")
        else:
            results = model.runner.run(model.outputs, feed, run_options)
        outputs = dict(zip(model.outputs, results))
        if steps.post is None:
            return [outputs[name] for name in wanted]
        try:
            answered = steps.post(outputs)
        except Exception as exc:
            raise step_failed("post", steps.module, exc) from None
        return self._client_values(wanted, answered, "post")

    def _driven(self, wanted: list[str], feed: dict[str, Any], run_options: Any) -> list[Any]:
        """A step that calls the model itself, as often as it needs (a recurrent model over a stream), or a
        chain's models one after another: every call runs under the same run options, so the request's
        deadline stops the next call. A chain's drive gets {member name: call}; a model's, the one call."""
        steps = self.steps
        assert steps.drive is not None
        failures: list[Exception] = []  # what the models' calls raised, to tell from the step's own errors
        spent = {name: {"runs": 0, "compute_us": 0.0} for name in self.stages}
        counting = threading.Lock()  # a drive step may call its models from several threads at once
        self.last_stages = None

        def caller(name: str, stage: Stage) -> Callable[[dict[str, Any]], dict[str, Any]]:
            def call(tensors: dict[str, Any]) -> dict[str, Any]:
                with counting:
                    if spent[name]["runs"] >= MAX_MODEL_CALLS:
                        exc = StepFailed(RESOURCE_EXHAUSTED, f"the drive step of {steps.module} called {'the model ' + name if name else 'the model'} more than {MAX_MODEL_CALLS} times in one request")
                        failures.append(exc)
                        raise exc
                    spent[name]["runs"] += 1
                try:
                    started = time.monotonic_ns()
                    results = self._run_model(stage, name, self._model_feed(stage, name, tensors, "drive"), run_options, "drive")
                    with counting:
                        spent[name]["compute_us"] += (time.monotonic_ns() - started) / 1000
                    return dict(zip(stage.outputs, results))
                except Exception as exc:
                    failures.append(exc)
                    raise
            return call

        calls = {name: caller(name, stage) for name, stage in self.stages.items()}
        try:
            answered = steps.drive(feed, calls if self.chain else calls[""])
        except Exception as exc:
            if failures and exc is failures[-1]:
                raise  # a model's own failure, a refusal of the step's tensors, or the deadline's stop
            raise step_failed("drive", steps.module, exc) from None
        values = self._client_values(wanted, answered, "drive")
        if self.chain:
            self.last_stages = spent
        return values

    def _run_model(self, stage: Stage, name: str, feed: dict[str, Any], run_options: Any, role: str) -> list[Any]:
        """A model on tensors a step made: a refusal of them is the step's fault, not the caller's."""
        try:
            return stage.runner.run(stage.outputs, feed, run_options)  # type: ignore[no-any-return]
        except Exception as exc:
            if error_code_for(exc) != INVALID_ARGUMENT:
                raise
            shapes = ", ".join(f"{key!r} {list(np.shape(value))}" for key, value in feed.items())
            whose = f"the model {name}" if name else "the model"
            raise StepFailed(INTERNAL, f"{whose} refused what the {role} step of {self.steps.module} made ({shapes}): {type(exc).__name__}: {str(exc).strip()}"[:2000]) from None

    def _model_feed(self, stage: Stage, name: str, prepared: Any, role: str = "pre") -> dict[str, Any]:
        whose = f"the model {name}" if name else "the model"
        if not isinstance(prepared, dict) or set(prepared) != set(stage.inputs):
            got = sorted(prepared) if isinstance(prepared, dict) else type(prepared).__name__
            raise StepFailed(INTERNAL, f"the {role} step of {self.steps.module} gave {whose} {got}; it takes exactly {sorted(stage.inputs)}")
        feed = {}
        for key, value in prepared.items():
            datatype = stage.inputs[key]
            try:
                if datatype == "BYTES":
                    array = np.asarray(value, dtype=object)
                    feed[key] = for_onnxruntime(datatype, np.vectorize(bytes_element, otypes=[object])(array) if array.size else array)
                elif datatype == "BF16":
                    feed[key] = for_onnxruntime(datatype, value.bits if isinstance(value, BF16Array) else np.asarray(value, dtype=np.uint16))
                else:
                    feed[key] = np.ascontiguousarray(value, dtype=DATATYPE_TO_NUMPY[datatype])
            except (TypeError, ValueError, OverflowError, UnicodeDecodeError) as exc:  # the step's tensors, not the caller's
                raise StepFailed(INTERNAL, f"the {role} step of {self.steps.module} gave {whose} input {key!r} that is not {datatype}: {exc}"[:1000]) from None
        return feed

    def _client_values(self, wanted: list[str], answered: Any, role: str) -> list[Any]:
        """The step's outputs as arrays of the declared datatypes and shapes, in `wanted` order."""
        if not isinstance(answered, dict):
            raise StepFailed(INTERNAL, f"the {role} step of {self.steps.module} returned {type(answered).__name__}, not a dict of outputs")
        values = []
        for name in wanted:
            spec = self.client_outputs.get(name)
            if spec is None or name not in answered:
                raise StepFailed(INTERNAL, f"the {role} step of {self.steps.module} did not return output {name!r}")
            values.append(_as_declared(answered[name], spec, role, self.steps.module))
        return values


def _as_declared(value: Any, spec: dict[str, Any], role: str, module: str) -> Any:
    datatype, shape = spec["datatype"], spec["shape"]
    array: Any
    try:
        if datatype == "BYTES":
            if isinstance(value, (bytes, str)):
                array = np.empty((), dtype=object)
                array[()] = bytes_element(value)
            else:
                array = np.asarray(value, dtype=object)
                array = np.vectorize(bytes_element, otypes=[object])(array) if array.size else array
        elif datatype == "BF16":
            array = value if isinstance(value, BF16Array) else BF16Array(np.asarray(value, dtype=np.uint16))
        else:
            array = np.asarray(value, dtype=DATATYPE_TO_NUMPY[datatype])
    except (TypeError, ValueError, OverflowError) as exc:  # the step's output, not the caller's mistake
        raise StepFailed(INTERNAL, f"the {role} step of {module}: output {spec['name']!r} is not {datatype}: {exc}"[:1000]) from None
    got: list[int] = list(array.shape)
    if len(got) != len(shape) or any(want >= 0 and want != have for want, have in zip(shape, got)):
        raise StepFailed(INTERNAL, f"the {role} step of {module}: output {spec['name']!r} has shape {got}; it declared {shape}")
    return array
