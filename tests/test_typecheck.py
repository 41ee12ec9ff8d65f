"""pyllm.typecheck.type_problem: the one check of a config value against its annotation (ModelConfig, TrainConfig,
task files)."""

import math
import typing

import numpy as np
import pytest

from pyllm.eval.tasks import TaskConfig, TaskError
from pyllm.model import ModelConfig
from pyllm.pipeline import PipelineConfig
from pyllm.post.dpo import DPOConfig
from pyllm.post.grpo import GRPOConfig
from pyllm.post.lora import LoRAConfig
from pyllm.train.config import ConfigError, TrainConfig
from pyllm.typecheck import type_problem


@pytest.mark.parametrize("value, hint, want", [
    (3, int, None), (np.int64(3), int, None), (3.0, int, "an integer"), ("3", int, "an integer"),
    (True, int, "an integer"), (True, bool, None), (1, bool, "a boolean"), ("yes", bool, "a boolean"),
    (3, float, None), (2.5, float, None), (np.float32(2.5), float, None), (math.nan, float, "a finite number"),
    (-math.inf, float, "a finite number"), (False, float, "a number"), ("1e-3", float, "a number"),
    ("x", str, None), (1, str, "a string"), (None, int | None, None), (None, int, "an integer"),
    (2, int | None, None), (2.5, int | None, "an integer"), ({"a": 1}, dict | None, None),
    (["a", "b"], list[str], None), (("a",), list[str], None), ("ab", list[str], "a list of strings"),
    ([1, "b"], list[int], "a list of integers"), ([True], list[int], "a list of integers"),
    (["a"], tuple[str, ...], None), ("rm", tuple[str, ...], "a list of strings"), ({1: 0.5}, dict[int, float], None),
    ([1], dict, "a mapping of keys to values"), (print, str | typing.Callable, None), (3, str | typing.Callable, None),
    (3, str | bool, "a string or a boolean"), (None, str | bool, "a string or a boolean"),
])
def test_type_problem(value, hint, want):
    assert type_problem(value, hint) == want


def test_a_single_value_may_stand_for_a_list():
    assert type_problem("Q:", list[str], scalar_as_list=True) is None
    assert type_problem(3, list[str], scalar_as_list=True) == "a list of strings (or a single string)"


@pytest.mark.parametrize("make, error, message", [
    (lambda: ModelConfig(n_layer="2"), ValueError, "ModelConfig: n_layer='2' must be an integer"),
    (lambda: ModelConfig(norm_eps=math.nan), ValueError, "ModelConfig: norm_eps=nan must be a finite number"),
    (lambda: ModelConfig(bias="false"), ValueError, "ModelConfig: bias='false' must be a boolean"),
    (lambda: ModelConfig(n_kv_head=2.0), ValueError, "ModelConfig: n_kv_head=2.0 must be an integer"),
    (lambda: TrainConfig(max_steps=2.5), ConfigError, "TrainConfig: max_steps=2.5 must be an integer"),
    (lambda: TrainConfig(lr=math.inf), ConfigError, "TrainConfig: lr=inf must be a finite number"),
    (lambda: DPOConfig(beta="0.1"), ValueError, "DPOConfig: beta='0.1' must be a number"),
    (lambda: GRPOConfig(group_size=4.0), ValueError, "GRPOConfig: group_size=4.0 must be an integer"),
    (lambda: LoRAConfig(rank="4"), ValueError, "LoRAConfig: rank='4' must be an integer"),
    (lambda: PipelineConfig(skip="rm"), ValueError, "PipelineConfig: skip='rm' must be a list of strings"),
    (lambda: TaskConfig(name="t", kind="generation", template="Q", temperature=math.nan), TaskError,
     "task 't': field 'temperature' must be a finite number, got nan"),
    (lambda: TaskConfig(name="t", kind="generation", template="Q", pass_k=["1"]), TaskError,
     "task 't': field 'pass_k' must be a list of integers (or a single integer), got ['1']"),
])
def test_each_config_names_the_field_and_what_it_must_be(make, error, message):
    with pytest.raises(error) as e:
        make()
    assert str(e.value) == message


def test_task_values_are_normalised():
    t = TaskConfig(name="t", kind="generation", template="Q", stop="Q:", temperature=1, pass_k=1, num_samples=2)
    assert t.stop == ["Q:"] and t.pass_k == [1] and t.temperature == 1.0 and isinstance(t.temperature, float)
