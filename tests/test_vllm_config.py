"""Connector configuration: extra-config keys, the YAML file, and the original connector's keys."""

from __future__ import annotations

import pytest

from stratacache.adapters.vllm import kv_transfer_config, settings_from_extra_config
from stratacache.adapters.vllm.settings import LEGACY_KEYS
from stratacache.config import ConfigError

MIB = 1 << 20

# legacy key, value, (config path, expected value) or None when it is deprecated
LEGACY_CASES = [
    ("use_cxl", True, ("tiers.shared.enabled", True)),
    ("writeback", True, ("tiers.cpu.write_policy", "write_back")),
    ("cpu_capacity_mb", 96, ("tiers.cpu.capacity", 96 * MIB)),
    ("chunk_size", 512, ("connector.chunk_size", 512)),
    ("save_partial_chunks", True, ("connector.save_partial_chunks", True)),
    ("log_stats", False, ("connector.log_stats", False)),
    ("log_every", 7, ("connector.log_every", 7)),
    ("log_min_interval_s", 0.5, ("connector.log_min_interval_s", 0.5)),
    ("debug", True, ("connector.debug", True)),
    ("cxl_dax_device", "/dev/shm/sc-test-vllm-cfg-dax.region", ("tiers.shared.path",
                                                              "/dev/shm/sc-test-vllm-cfg-dax.region")),
    ("cxl_reset_metadata", True, ("tiers.shared.reset", True)),
    ("telemetry.export", True, ("telemetry.prometheus", True)),
    ("bundle_layers", True, None),
    ("tensor_codec", "stable", None),
    ("tensor_header_in_payload", False, None),
]


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def test_every_documented_legacy_key_is_covered_here():
    assert {case[0] for case in LEGACY_CASES} == set(LEGACY_KEYS)


@pytest.mark.parametrize("prefix", ["", "stratacache."])
@pytest.mark.parametrize("key,value,expect", LEGACY_CASES, ids=[c[0] for c in LEGACY_CASES])
def test_legacy_key_in_extra_config(prefix, key, value, expect):
    settings = settings_from_extra_config({prefix + key: value})
    cfg = settings.load()
    if expect is None:
        assert len(settings.deprecations) == 1
        line = settings.deprecations[0]
        assert key in line and "deprecated" in line and "\n" not in line
    else:
        assert settings.deprecations == []
        assert _get(cfg, expect[0]) == expect[1]


@pytest.mark.parametrize("key,value,expect", LEGACY_CASES, ids=[c[0] for c in LEGACY_CASES])
def test_legacy_key_in_yaml(tmp_path, key, value, expect):
    import yaml

    path = tmp_path / "sc.yaml"
    # Legacy keys next to new-schema keys in one file; the extra config wins over the file.
    path.write_text(yaml.safe_dump({key: value, "tiers": {"disk": {"capacity": "3GiB"}}}))
    settings = settings_from_extra_config({"stratacache.config_path": str(path),
                                           "connector.load_mode": "async"})
    cfg = settings.load()
    assert cfg.tiers.disk.capacity == 3 * (1 << 30)
    assert cfg.connector.load_mode == "async"
    if expect is None:
        assert len(settings.deprecations) == 1 and key in settings.deprecations[0]
    else:
        assert _get(cfg, expect[0]) == expect[1]


def test_legacy_keys_under_connector_section_and_telemetry_export(tmp_path):
    path = tmp_path / "sc.yaml"
    path.write_text("connector:\n  chunk_size: 384\n  bundle_layers: true\n"
                    "telemetry:\n  export: true\n  port: 9999\n")
    settings = settings_from_extra_config({"config_path": str(path)})
    cfg = settings.load()
    assert cfg.connector.chunk_size == 384
    assert cfg.telemetry.prometheus is True and cfg.telemetry.port == 9999
    assert any("bundle_layers" in line for line in settings.deprecations)


def test_use_cxl_false_keeps_the_shared_tier_and_says_why():
    settings = settings_from_extra_config({"use_cxl": False})
    assert settings.load().tiers.shared.enabled is True
    assert "tiers.shared.enabled" in settings.deprecations[0]


def test_defaults_are_cpu_plus_shared_on_dev_shm_and_no_server():
    cfg = settings_from_extra_config({}).load()
    assert cfg.tiers.cpu.enabled and cfg.tiers.shared.enabled
    assert cfg.tiers.shared.path.startswith("/dev/shm/")
    assert not cfg.tiers.redis.enabled and not cfg.telemetry.prometheus


def test_schema_paths_nested_and_dotted():
    settings = settings_from_extra_config({
        "stratacache.tiers.cpu.capacity": "64MiB",
        "connector": {"load_mode": "async", "chunk_size": 128}})
    cfg = settings.load()
    assert cfg.tiers.cpu.capacity == 64 * MIB
    assert cfg.connector.load_mode == "async" and cfg.connector.chunk_size == 128


@pytest.mark.parametrize("extra,needle", [
    ({"stratacache.no_such_key": 1}, "no_such_key"),
    ({"connector.load_mode": "sometimes"}, "connector.load_mode"),
    ({"cpu_capacity_mb": "lots"}, "cpu_capacity_mb"),
    ({"writeback": "maybe"}, "writeback"),
    ({"stratacache.config_path": "/nonexistent/sc-test-vllm.yaml"}, "sc-test-vllm.yaml"),
    ({7: "seven"}, "kv_connector_extra_config.7: keys must be strings"),
])
def test_bad_input_names_the_key(extra, needle):
    with pytest.raises(ConfigError) as err:
        settings_from_extra_config(extra).load()
    assert needle in str(err.value)


def test_kv_transfer_config_dict(tmp_path):
    path = tmp_path / "sc.yaml"
    path.write_text("connector:\n  chunk_size: 512\n")
    d = kv_transfer_config(str(path), **{"connector.load_mode": "async", "chunk_size": 256})
    assert d["kv_connector"] == "StrataCacheConnectorV1"
    assert d["kv_connector_module_path"] == "stratacache.adapters.vllm.connector_v1"
    assert d["kv_role"] == "kv_both" and d["kv_load_failure_policy"] == "recompute"
    extra = d["kv_connector_extra_config"]
    assert extra == {"stratacache.config_path": str(path), "stratacache.connector.load_mode": "async",
                     "stratacache.chunk_size": 256}
    cfg = settings_from_extra_config(extra).load()
    assert cfg.connector.chunk_size == 256  # the explicit key beats the file
    with pytest.raises(ConfigError, match="bogus"):
        kv_transfer_config(bogus=1)


def test_kv_transfer_config_is_accepted_by_vllm():
    from vllm.config import KVTransferConfig

    conf = KVTransferConfig(**kv_transfer_config(**{"connector.chunk_size": 256}))
    assert conf.kv_connector == "StrataCacheConnectorV1"
    assert conf.get_from_extra_config("stratacache.connector.chunk_size", None) == 256


# -- issue 18: legacy values are converted by a pydantic model, not by hand.

@pytest.mark.parametrize("key,value,expect", [
    ("cpu_capacity_mb", "96", ("tiers.cpu.capacity", 96 * MIB)),
    ("use_cxl", "yes", ("tiers.shared.enabled", True)),
    ("writeback", "on", ("tiers.cpu.write_policy", "write_back")),
    ("writeback", "0", ("tiers.cpu.write_policy", "write_through")),
    ("log_every", "7", ("connector.log_every", 7)),
    ("chunk_size", 512.0, ("connector.chunk_size", 512)),
    ("log_min_interval_s", "0.25", ("connector.log_min_interval_s", 0.25)),
    ("telemetry.export", "true", ("telemetry.prometheus", True)),
])
def test_legacy_values_given_as_strings_are_converted(key, value, expect):
    """The original connector read its keys from JSON strings; they keep working."""
    cfg = settings_from_extra_config({"stratacache." + key: value}).load()
    assert _get(cfg, expect[0]) == expect[1]
    assert type(_get(cfg, expect[0])) is type(expect[1])


@pytest.mark.parametrize("key,value,words", [
    ("chunk_size", 12.5, ["kv_connector_extra_config.stratacache.chunk_size", "12.5", "integer"]),
    ("cpu_capacity_mb", 1.5, ["cpu_capacity_mb", "1.5"]),
    ("cpu_capacity_mb", 0, ["kv_connector_extra_config.stratacache.cpu_capacity_mb", "minimum 1"]),
    ("log_every", True, ["log_every", "True"]),
    ("use_cxl", None, ["use_cxl", "null"]),
    ("debug", "sometimes", ["debug", "'sometimes'"]),
    ("log_min_interval_s", "inf", ["log_min_interval_s", "'inf'"]),
    ("cxl_dax_device", 7, ["cxl_dax_device", "7"]),
])
def test_legacy_value_that_would_be_taken_wrong_is_refused(key, value, words):
    """A fractional token count or megabyte count is refused, naming the legacy key as given,
    instead of being truncated (int(12.5) == 12 was the old conversion)."""
    with pytest.raises(ConfigError) as err:
        settings_from_extra_config({"stratacache." + key: value}).load()
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_legacy_key_types_cover_every_legacy_key():
    from stratacache.adapters.vllm.settings import LegacyKeyTypes
    assert {name.replace(".", "_") for name in LEGACY_KEYS} == set(LegacyKeyTypes.model_fields)
