"""Each kind of choice is one table: the config's Literal accepts exactly that table's keys."""
import typing

import pytest

from handclip.config import LossConfig, ModelConfig, OptimConfig, config_from_dict
from handclip.data.prepare import PREPARERS
from handclip.engine.schedule import OPTIMIZERS, SCHEDULES
from handclip.errors import UserError
from handclip.hand_datasets import ALL_ASPECTS, DATASET_OF_ASPECT, HAND_DATASETS
from handclip.losses.terms import LOSS_TERMS
from handclip.models.classifiers import CLASSIFIERS
from handclip.models.heads import HEADS
from handclip.models.necks import NECKS

TABLES = [
    (ModelConfig, "classifier", CLASSIFIERS),
    (ModelConfig, "head", HEADS),
    (ModelConfig, "neck", NECKS),
    (OptimConfig, "optimizer", OPTIMIZERS),
    (OptimConfig, "schedule", SCHEDULES),
]


@pytest.mark.parametrize("section, key, table", TABLES, ids=[key for _, key, _ in TABLES])
def test_the_config_literal_lists_the_table_keys(section, key, table):
    assert set(typing.get_args(typing.get_type_hints(section)[key])) == set(table)


@pytest.mark.parametrize("section, key, table", TABLES, ids=[key for _, key, _ in TABLES])
def test_a_choice_outside_the_table_is_a_user_error_naming_the_key(section, key, table):
    name = {ModelConfig: "model", OptimConfig: "optim"}[section]
    with pytest.raises(UserError, match=f"{name}.{key}"):
        config_from_dict({name: {key: "no-such-choice"}})


def test_every_loss_term_has_a_weight_in_the_loss_config():
    weights = {f.name for f in LossConfig.__dataclass_fields__.values() if f.type in ("float", float)}
    assert set(LOSS_TERMS) <= weights


def test_the_dataset_table_drives_aspects_preparation_and_the_aspect_map():
    assert set(PREPARERS) == set(HAND_DATASETS)
    assert ALL_ASPECTS == tuple(a for d in HAND_DATASETS.values() for a in d.aspects)
    assert {DATASET_OF_ASPECT[a] for a in ALL_ASPECTS} == set(HAND_DATASETS)
    for dataset in HAND_DATASETS.values():
        assert set(dataset.train_id_threshold) == set(dataset.aspects)
    with pytest.raises(UserError, match="data.aspects"):
        config_from_dict({"data": {"aspects": ["no_such_aspect"]}})
