"""The one settings object: frozen, validated once, what the state reads; the public surface and
the deprecated names of 0.1.0."""

from __future__ import annotations

import dataclasses
import pickle
import warnings

import pytest
import torch

import gradvac_dist
from gradvac_dist import GradVacSettings, GradVacState


def test_state_keeps_its_keyword_arguments_in_one_frozen_settings_object():
    state = GradVacState(
        num_tasks=3, beta=0.3, eps=1e-6, seed=7, grouping="module", strategy="replicated", shared_params="encoder",
        on_nonfinite="skip", check_sync_every=5,
    )  # fmt: skip
    expected = GradVacSettings(
        num_tasks=3, beta=0.3, eps=1e-6, seed=7, grouping="module", strategy="replicated",
        shared_params=("encoder",), on_nonfinite="skip", check_sync_every=5,
    )  # fmt: skip
    assert state.settings == expected
    for field in dataclasses.fields(GradVacSettings):
        assert getattr(state, field.name) == getattr(expected, field.name), field.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.settings.beta = 0.9  # type: ignore[misc]


@pytest.mark.parametrize(
    "name", ["num_tasks", "beta", "grouping", "weighting", "settings", "process_group", "trajectory"]
)
def test_a_setting_cannot_be_assigned_after_construction(name):
    state = GradVacState(num_tasks=2)
    before = repr(state)
    with pytest.raises(AttributeError, match=rf"GradVacState\.{name} .*Build a new GradVacState"):
        setattr(state, name, None)
    assert repr(state) == before


def test_settings_validate_every_field_once():
    for kwargs, match in [
        ({"num_tasks": 0}, "num_tasks must be an int >= 1"),
        ({"beta": 1.5}, "beta must be a number in"),
        ({"eps": -1.0}, "eps must be a number >= 0"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"grouping": "layer"}, "grouping must be one of"),
        ({"strategy": "ring"}, "strategy must be one of"),
        ({"shared_params": []}, "shared_params must be a non-empty list"),
        ({"shared_params": 3}, "shared_params must be a non-empty list"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of"),
        ({"check_sync_every": 0}, "check_sync_every must be None or an int >= 1"),
        ({"weighting": 3}, "weighting must be a callable"),
    ]:
        with pytest.raises(ValueError, match=match):
            GradVacSettings(**kwargs)
    with pytest.raises(ValueError, match="num_tasks must be an int >= 1"):
        GradVacState(num_tasks=None)  # type: ignore[arg-type]  (None is for the single-process aggregators)


def test_pickle_carries_the_settings_and_the_trajectory_not_the_group():
    state = GradVacState(num_tasks=3, beta=0.3, seed=5, grouping="parameter", process_group=object())
    state.trajectory.advance(torch.eye(3, dtype=torch.float64).repeat(2, 1, 1), (4, 4), state.beta, state.eps)
    clone = pickle.loads(pickle.dumps(state))
    assert clone.settings == state.settings and clone.process_group is None
    assert clone.step == 1 and torch.equal(clone.trajectory.targets, state.trajectory.targets)
    assert repr(clone) == repr(state)


def test_single_process_aggregators_read_the_same_settings():
    agg = gradvac_dist.GradVac(beta=0.2, seed=4, on_nonfinite="skip")
    assert agg.settings == GradVacSettings(beta=0.2, seed=4, on_nonfinite="skip")
    weighted = gradvac_dist.GramianWeightedAggregator(lambda g: torch.ones(g.shape[0]), seed=2)
    assert weighted.settings.seed == 2 and weighted.weighting is weighted.settings.weighting


def test_public_names_are_what_users_call_and_annotate_with():
    assert "GramianAggregator" in gradvac_dist.__all__  # the annotated type of backward(aggregator=)
    assert issubclass(gradvac_dist.GramianWeightedAggregator, gradvac_dist.GramianAggregator)
    for internal in ("StepWorkspace", "CommCounters", "GradVacConfig", "save_checkpoint", "load_checkpoint"):
        assert internal not in gradvac_dist.__all__
    for name in gradvac_dist.__all__:
        assert getattr(gradvac_dist, name).__doc__ or name.isupper(), name


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("WeightedAggregator", "GramianWeightedAggregator"),
        ("GradVacConfig", "GradVacSettings"),
        ("StepWorkspace", None),
        ("CommCounters", None),
        ("save_checkpoint", None),
        ("load_checkpoint", None),
    ],
)
def test_old_names_stay_importable_for_one_release_with_a_deprecation_warning(old, new):
    with pytest.warns(DeprecationWarning, match=rf"gradvac_dist\.{old} is deprecated"):
        obj = getattr(gradvac_dist, old)
    if new is not None:
        assert obj is getattr(gradvac_dist, new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
            gradvac_dist.NoSuchName  # noqa: B018


def test_from_import_of_an_old_name_warns_too():
    with pytest.warns(DeprecationWarning, match="WeightedAggregator is deprecated"):
        from gradvac_dist import WeightedAggregator  # noqa: F401


def test_a_state_pickled_by_0_1_0_still_loads():
    """0.1.0 pickled the frozen config (beta, eps, seed, on_nonfinite) and the other settings apart."""

    class Config:  # what GradVacConfig held, as pickle restores it (attributes only)
        beta, eps, seed, on_nonfinite = 0.3, 1e-7, 5, "skip"

    source = GradVacState(num_tasks=3, beta=0.3, eps=1e-7, seed=5, on_nonfinite="skip", grouping="parameter")
    source.trajectory.advance(torch.eye(3, dtype=torch.float64).repeat(2, 1, 1), (4, 4), 0.3, 1e-7)
    old = {
        "num_tasks": 3, "config": Config(), "grouping": "parameter", "strategy": None, "shared_params": None,
        "check_sync_every": None, "weighting": None, "trajectory": source.trajectory.state_dict(),
    }  # fmt: skip
    state = GradVacState.__new__(GradVacState)
    state.__setstate__(old)
    assert state.settings == source.settings and state.step == 1
    assert torch.equal(state.trajectory.targets, source.trajectory.targets)
