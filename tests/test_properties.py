"""Property-based checks (hypothesis) of what users hand-edit: expert plans and mix specs either round-trip
or are refused with a one-line MoeSlimError, never another exception."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from moe_slim.api import parse_weights
from moe_slim.data.mixspec import parse_mix_text
from moe_slim.errors import MoeSlimError
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.families import family_of
from moe_slim.modeling.tiny import tiny_config

CONFIG = tiny_config("qwen3_moe")
FAMILY = family_of(CONFIG)
NAMES = ["model.layers.0.mlp", "model.layers.1.mlp"]

keeps = st.lists(st.integers(min_value=-2, max_value=9), min_size=0, max_size=9)
plans = st.builds(lambda a, b: ExpertPlan("qwen3_moe", 8, 2, [LayerPlan(NAMES[0], a), LayerPlan(NAMES[1], b)]),
                  keeps, keeps)


@settings(max_examples=200, deadline=None)
@given(plans)
def test_plans_round_trip_and_validate_or_refuse_in_one_line(plan: ExpertPlan) -> None:
    again = ExpertPlan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    try:
        plan.validate(FAMILY, CONFIG, NAMES)
    except MoeSlimError as exc:
        assert "\n" not in str(exc)
        bad = [l.keep for l in plan.layers if len(set(l.keep)) != len(l.keep) or len(l.keep) < 2
               or any(not 0 <= i < 8 for i in l.keep)]
        assert bad, f"a valid plan was refused: {exc}"
    else:
        assert all(len(set(l.keep)) == len(l.keep) >= 2 and all(0 <= i < 8 for i in l.keep) for l in plan.layers)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["general", "math", "code", "translation"]),
                       st.integers(min_value=0, max_value=9), min_size=1))
def test_mix_weights_round_trip(weights: dict[str, int]) -> None:
    text = ",".join(f"{d}={w}" for d, w in weights.items())
    if sum(weights.values()) == 0:
        try:
            parse_weights(text)
        except MoeSlimError:
            return
        raise AssertionError("all-zero weights were accepted")
    assert parse_weights(text) == {d: float(w) for d, w in weights.items()}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abgmct=,.@0123456789kM -", max_size=30))
def test_any_mix_text_parses_or_is_refused_in_one_line(text: str) -> None:
    for parse in (parse_weights, parse_mix_text):
        try:
            parse(text)
        except MoeSlimError as exc:
            assert "\n" not in str(exc)
