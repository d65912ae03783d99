import pytest

from autosod_ray.config import (
    ConfigError,
    EvaluateConfig,
    ExportConfig,
    PredictConfig,
    PreviewConfig,
    PseudolabelConfig,
    ReportConfig,
    SelfTrainConfig,
    TrainConfig,
    config_hash,
    load_config,
    parse_override,
)
from tests.conftest import REPO

POTNET_YAML = REPO / "configs" / "potnet.yaml"


SHIPPED = {
    "potnet": PseudolabelConfig,
    "cpu-offline": PseudolabelConfig,
    "smoke": PseudolabelConfig,
    "train": TrainConfig,
    "train-cpu": TrainConfig,
    "train-smoke": TrainConfig,
    "predict": PredictConfig,
    "predict-cpu": PredictConfig,
    "evaluate": EvaluateConfig,
    "preview": PreviewConfig,
    "report": ReportConfig,
    "export": ExportConfig,
    "selftrain-cpu": SelfTrainConfig,
}


def test_every_shipped_config_validates_as_its_job_reads_it():
    assert {p.stem for p in (REPO / "configs").glob("*.yaml")} == set(SHIPPED)
    for name, schema in SHIPPED.items():
        load_config(schema, REPO / "configs" / f"{name}.yaml")
    cpu = load_config(TrainConfig, REPO / "configs" / "train-cpu.yaml")
    assert cpu.optim.freeze_encoder and cpu.data.cache_tokens and cpu.backbone.image_size == 448
    # self-training's students follow the laptop recipes: its sections are those files
    rounds = load_config(SelfTrainConfig, REPO / "configs" / "selftrain-cpu.yaml")
    assert rounds.train == cpu
    assert rounds.predict == load_config(PredictConfig, REPO / "configs" / "predict-cpu.yaml")


def test_paper_defaults_load():
    cfg = load_config(PseudolabelConfig, POTNET_YAML)
    assert cfg.backbone.name == "vit_small_patch8_224.dino"
    assert cfg.potnet.clustering == "dual" and cfg.potnet.fusion == "smooth"


def test_override_wins_over_yaml_and_is_typed():
    cfg = load_config(
        PseudolabelConfig,
        POTNET_YAML,
        [
            "potnet.num_clusters=5",
            "potnet.transport=false",
            "backbone.weights=s3://b/w.safetensors",
        ],
    )
    assert cfg.potnet.num_clusters == 5 and cfg.potnet.transport is False
    assert cfg.backbone.weights == "s3://b/w.safetensors"


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(PseudolabelConfig, POTNET_YAML, ["potnet.num_cluster=3"])
    msg = str(err.value)
    assert "potnet.num_cluster" in msg and "num_clusters" in msg


def test_bad_value_names_key_and_choices():
    with pytest.raises(ConfigError) as err:
        load_config(PseudolabelConfig, None, ["potnet.seed=kmeans"])
    assert "potnet.seed" in str(err.value) and "'attention'" in str(err.value)
    with pytest.raises(ConfigError, match="potnet.num_clusters"):
        load_config(PseudolabelConfig, None, ["potnet.num_clusters=0"])


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("potnet.seed")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PseudolabelConfig, "no/such.yaml")


def test_hash_is_stable_and_sensitive():
    a = load_config(PseudolabelConfig, POTNET_YAML)
    b = load_config(PseudolabelConfig, POTNET_YAML)
    c = load_config(PseudolabelConfig, POTNET_YAML, ["potnet.num_clusters=4"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


@pytest.mark.parametrize(
    "name, schema",
    [
        ("potnet.yaml", "PseudolabelConfig"),
        ("cpu-offline.yaml", "PseudolabelConfig"),
        ("smoke.yaml", "PseudolabelConfig"),
        ("evaluate.yaml", "EvaluateConfig"),
        ("preview.yaml", "PreviewConfig"),
    ],
)
def test_every_shipped_config_validates_under_its_job(name, schema):
    import autosod_ray.config as config

    load_config(getattr(config, schema), REPO / "configs" / name)


def test_the_refinement_enters_the_labelling_hash_only_when_on():
    """Both labelling jobs refine by default, and the refinement is hashed into config_hash;
    off, it is absent from the settings (outputs made before it existed keep their hash)."""
    on = PseudolabelConfig()
    off = load_config(PseudolabelConfig, None, ["refine.method=none"])
    assert on.labelling_settings("w")["refine"] == {
        "method": "guided",
        "radius": 1 / 32,
        "eps": 1e-3,
    }
    assert "refine" not in off.labelling_settings("w")
    assert PredictConfig().refine == on.refine  # one filter, one default, in both jobs


def test_every_refinement_the_config_offers_exists_and_has_a_quality_fit():
    """A method the config accepts but the actors cannot run would fail every image inside
    the cluster instead of the config before it: the three lists are one."""
    import typing

    from autosod_ray.config import RefineSection
    from autosod_ray.edge_refine import REFINEMENTS
    from autosod_ray.model.quality import PREDICTION_QUALITY

    offered = set(typing.get_args(RefineSection.model_fields["method"].annotation))
    assert offered == set(REFINEMENTS) == set(PREDICTION_QUALITY)


def test_the_report_rules_have_one_default():
    """The report's thresholds live in three places (the pure settings, the job's config,
    configs/report.yaml): they must agree."""
    from autosod_ray.report import ReportSettings

    shipped = load_config(ReportConfig, REPO / "configs" / "report.yaml")
    assert ReportSettings.of(shipped) == ReportSettings() == ReportSettings.of(ReportConfig())
