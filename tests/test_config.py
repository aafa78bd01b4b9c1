"""Config loading: defaults, precedence, sizes, and bad configs that must name the bad key/value."""

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from stratacache.config import (DEFAULT_PATH, ConfigError, StrataConfig, describe_config, load_config,
                                parse_size)
from stratacache.config.schema import StrataConfig as ConfigModel, section_type


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_defaults_load_and_normalise():
    cfg = load_config()
    assert isinstance(cfg, StrataConfig)
    assert cfg.tiers.cpu.capacity == 2 << 30
    assert cfg.tiers.shared.file_mode == 0o600
    assert cfg.namespaces["params"].priority > cfg.namespaces["kv"].priority
    assert cfg.connector.chunk_size == 256
    assert cfg.telemetry.host == "127.0.0.1" and cfg.telemetry.prometheus is False
    # to_dict is plain YAML and loads back to the same config
    again = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert again["tiers"]["shared"]["file_mode"] == "0600"
    assert again["tiers"]["cpu"]["capacity"] == 2 << 30


def test_packaged_default_is_the_repo_config():
    repo = os.path.join(os.path.dirname(__file__), "..", "config.yaml")
    assert os.path.samefile(DEFAULT_PATH, repo)


def test_precedence_defaults_file_env_overrides(tmp_path, monkeypatch):
    f = write(tmp_path, """
        tiers:
          cpu: {capacity: 64MiB, eviction: lru}
        lease_s: 5
    """)
    env = write(tmp_path, "tiers: {cpu: {capacity: 32MiB}}\n", "env.yaml")
    monkeypatch.setenv("STRATACACHE_CONFIG", env)
    assert load_config().tiers.cpu.capacity == 32 << 20               # env var used without path
    cfg = load_config(f, overrides={"tiers": {"cpu": {"eviction": "s3fifo"}}, "connector.chunk_size": 128})
    assert cfg.tiers.cpu.capacity == 64 << 20                         # the argument beats the env var
    assert cfg.tiers.cpu.eviction == "s3fifo"                          # overrides beat the file
    assert cfg.lease_s == 5.0 and isinstance(cfg.lease_s, float)
    assert cfg.connector.chunk_size == 128
    assert cfg.tiers.cpu.write_policy == "write_through"               # untouched default
    assert cfg.source[-1] == "overrides"


@pytest.mark.parametrize("text,expected", [
    ("4GiB", 4 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("1024", 1024),
    (4096, 4096), ("2 kib", 2048), ("7B", 7), ("1G", 1 << 30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_describe_config_covers_every_key():
    rows = describe_config()
    paths = [r[0] for r in rows]
    assert len(paths) == len(set(paths))

    def leaves(model, prefix=""):
        for k, field in model.model_fields.items():
            if section_type(field) is not None:
                yield from leaves(section_type(field), f"{prefix}{k}.")
            else:
                yield prefix + k
    assert set(paths) == set(leaves(ConfigModel))
    # every key of the packaged defaults has a row, and every row a key there
    defaults = yaml.safe_load(DEFAULT_PATH.read_text())

    def yaml_leaves(node, prefix=""):
        for k, v in node.items():
            yield from yaml_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    assert set(paths) == set(yaml_leaves(defaults))
    assert all(doc for _p, _t, _d, doc in rows)
    assert ("tiers.cpu.capacity", "size (e.g. 4GiB)", "2GiB") == rows[paths.index("tiers.cpu.capacity")][:3]


def test_config_is_read_only():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.tiers.cpu.capacity = 1
    with pytest.raises(AttributeError, match="tiers.cpu.nope"):
        cfg.tiers.cpu.nope


# (YAML text or overrides dict, words the message must contain)
BAD = [
    ("tiers: {cpu: {capacty: 1GiB}}", ["tiers.cpu.capacty", "did you mean tiers.cpu.capacity"]),
    ("tier: {}", ["tier", "did you mean tiers"]),
    ("tiers: {cpu: {capacity: -1GiB}}", ["tiers.cpu.capacity", "-1GiB", "negative"]),
    ("tiers: {cpu: {capacity: 4 parsecs}}", ["tiers.cpu.capacity", "4 parsecs"]),
    ("tiers: {cpu: {capacity: 0}}", ["tiers.cpu.capacity", "minimum"]),
    ("tiers: {cpu: {enabled: 'yes please'}}", ["tiers.cpu.enabled", "yes please"]),
    ("tiers: {cpu: {eviction: fifo}}", ["tiers.cpu.eviction", "'fifo'", "lru", "s3fifo"]),
    ("tiers: {cpu: {write_policy: writeback}}", ["tiers.cpu.write_policy", "writeback"]),
    ("tiers: {disk: {io_threads: 0}}", ["tiers.disk.io_threads", "0"]),
    ("tiers: {disk: {io_threads: 2.5}}", ["tiers.disk.io_threads", "2.5"]),
    ("tiers: {shared: {file_mode: '0666'}}", ["tiers.shared.file_mode", "0666"]),
    ("tiers: {shared: {file_mode: 600}}", ["tiers.shared.file_mode", "600"]),
    ("tiers: {redis: {url: 'http://localhost:6379'}}", ["tiers.redis.url", "http://localhost:6379"]),
    ("tiers: {redis: {tls_ca_file: /nonexistent/ca.pem}}", ["tiers.redis.tls_ca_file", "/nonexistent/ca.pem"]),
    ("tiers: {redis: {retry_backoff_s: 5, retry_backoff_max_s: 1}}", ["tiers.redis.retry_backoff_max_s"]),
    ("lease_s: -3", ["lease_s", "-3"]),
    ("lease_s: null", ["lease_s", "null"]),
    ("namespaces: {kv: {quota: lots}}", ["namespaces.kv.quota", "lots"]),
    ("namespaces: {tensors: {quota: 1GiB}}", ["namespaces.tensors", "unknown key"]),
    ("telemetry: {port: 70000}", ["telemetry.port", "70000"]),
    ("connector: {chunk_size: '256'}", ["connector.chunk_size", "'256'"]),
    ("connector: {load_mode: lazy}", ["connector.load_mode", "lazy"]),
    ("tiers: {cpu: 4GiB}", ["tiers.cpu", "mapping"]),
    ("- just\n- a list\n", ["top level must be a mapping"]),
    ("tiers: {cpu: {capacity: 1GiB}\n", ["not valid YAML", "line"]),
    ("writeback: {max_dirty_bytes: 0}", ["writeback.max_dirty_bytes", "0"]),
    ("tiers: {cpu: {pin_memory: sometimes}}", ["tiers.cpu.pin_memory", "sometimes"]),
]


@pytest.mark.parametrize("text,words", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_config_file_names_key_and_value(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} missing from {msg!r}"


def test_bad_disk_path_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"tiers\.disk\.path: .*afile.* not a directory"):
        load_config(overrides={"tiers.disk.path": str(f)})


def test_bad_shared_path_missing_parent(tmp_path):
    with pytest.raises(ConfigError, match=r"tiers\.shared\.path: .*does not exist"):
        load_config(overrides={"tiers": {"shared": {"path": str(tmp_path / "no" / "region")}}})


def test_missing_file_and_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="tiers.cpu.capacity: .*bool"):
        load_config(overrides={"tiers.cpu.capacity": True})
    with pytest.raises(ConfigError, match="did you mean tiers.disk"):
        load_config(overrides={"tiers.dsk.enabled": True})


def test_cli_style_error_has_no_internal_traceback(tmp_path):
    """A user-facing load of a bad file fails with one clear line (no traceback frames of ours)."""
    bad = write(tmp_path, "tiers: {cpu: {capacty: 1GiB}}\n")
    code = ("import sys\nfrom stratacache.config import load_config, ConfigError\n"
            "try:\n    load_config(sys.argv[1])\nexcept ConfigError as e:\n"
            "    print(e); print(repr(e.__cause__), repr(e.__context__) if not e.__suppress_context__ else None)\n")
    out = subprocess.run([sys.executable, "-c", code, bad], capture_output=True, text=True, check=True).stdout
    assert "tiers.cpu.capacty: unknown key" in out
    assert out.strip().endswith("None None")   # no chained internal exception


def test_docs_config_table_is_current():
    from stratacache.config import config_table_markdown
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")).read()
    assert config_table_markdown() in docs, "docs/config.md is stale: regenerate its table"


# -- issue 24: configs that `config check` called valid but the engine could not start,
# and values that were silently taken wrong. Each is refused naming the key, by the one
# validation that `stratacache config check` and the engine both run.
HOSTILE = [
    ("tiers: {cpu: {capacity: 1000000TiB}}", ["tiers.cpu.capacity", "cannot be reserved on this host"]),
    ("tiers: {shared: {max_objects: 4000000000}}", ["tiers.shared.max_objects", "4000000000",
                                                     "maximum 1073741824"]),
    ("tiers: {redis: {url: 'redis://localhost:99999'}}", ["tiers.redis.url", "99999"]),
    ("tiers: {redis: {url: 'redis://localhost:6379/notanumber'}}", ["tiers.redis.url", "'notanumber'",
                                                                    "not a number"]),
    ("tiers: {redis: {url: 'redis://:::@@/x'}}", ["tiers.redis.url", "no valid host"]),
    ("tiers: {redis: {url: 'redis://a:6379/0,redis://b:0/0'}}", ["tiers.redis.url", "port 0"]),
    ("tiers: {cpu: {capacity: '1.5'}}", ["tiers.cpu.capacity", "'1.5'", "whole number"]),
    ("tiers: {disk: {capacity: '2.5B'}}", ["tiers.disk.capacity", "'2.5B'", "whole number"]),
    ("tiers: {cpu: {capacity: 9EiB}}", ["tiers.cpu.capacity", "9EiB"]),
    ("tiers: {cpu: {capacity: 1GiB, capacity: 2GiB}}", ["duplicate key 'capacity'", "line 1"]),
    ("tiers:\n  disk: {enabled: true}\n  disk: {enabled: false}\n", ["duplicate key 'disk'", "line 2"]),
    ("tiers: {shared: {path: relative/stratacache.region}}", ["tiers.shared.path", "relative path"]),
    ("tiers: {disk: {path: cache/disk}}", ["tiers.disk.path", "relative path"]),
    ("tiers: {disk: {path: '$SC_TEST_SURELY_UNSET/x'}}", ["tiers.disk.path", "$SC_TEST_SURELY_UNSET",
                                                          "not set"]),
    ("tiers: {shared: {path: '${SC_TEST_SURELY_UNSET}/r'}}", ["tiers.shared.path", "not set"]),
    ("tiers: {shared: {file_mode: '0000'}}", ["tiers.shared.file_mode", "'0000'", "owner"]),
    ("tiers: {shared: {file_mode: '0644'}}", ["tiers.shared.file_mode", "'0644'", "all users"]),
    ("tiers: {shared: {file_mode: '0200'}}", ["tiers.shared.file_mode", "owner"]),
]


@pytest.mark.parametrize("text,words", HOSTILE, ids=[h[0][:48] for h in HOSTILE])
def test_hostile_config_is_refused_naming_the_key(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for w in words:
        assert w in str(info.value), f"{w!r} missing from {str(info.value)!r}"
    from stratacache.engine import StorageEngine
    with pytest.raises(ConfigError) as info:          # the engine runs the same validation
        StorageEngine.from_config(path)
    assert words[0] in str(info.value)


def test_config_check_cli_refuses_what_the_engine_cannot_start(tmp_path):
    """`stratacache config check` (a real process) says invalid, naming the key, for every
    hostile config, and for a non-UTF-8 file names the file; never a traceback."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SC_TEST_SURELY_UNSET", None)
    cases = [(write(tmp_path, text, f"h{i}.yaml"), words) for i, (text, words) in enumerate(HOSTILE)]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("tiers:\n  disk:\n    path: /tmp/caf\u00e9\n".encode("latin-1"))
    cases.append((str(latin1), ["latin1.yaml", "not UTF-8", "line 3"]))
    for path, words in cases:
        res = subprocess.run([sys.executable, "-m", "stratacache.cli", "config", "check", path],
                             capture_output=True, text=True, timeout=60, env=env, cwd=root)
        assert res.returncode == 1, (path, res.stdout[-500:], res.stderr[-500:])
        assert "Traceback" not in res.stderr
        for w in words:
            assert w in res.stderr, f"{w!r} missing from {res.stderr!r}"


def test_non_utf8_config_file_is_a_clear_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"tiers:\n  cpu: {capacity: 1GiB}  # \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c\.yaml' is not UTF-8 text \(byte \d+, line 2"):
        load_config(str(p))


def test_paths_expand_home_and_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("SC_TEST_BASE", str(tmp_path))
    cfg = load_config(write(tmp_path, """\
        tiers:
          disk: {path: $SC_TEST_BASE/disk}
          shared: {path: '${SC_TEST_BASE}/x/../stratacache.region'}
        """))
    assert cfg.tiers.disk.path == str(tmp_path / "disk")
    assert cfg.tiers.shared.path == str(tmp_path / "stratacache.region")
    home = load_config(overrides={"tiers.disk.path": "~/sc-disk"}).tiers.disk.path
    assert home == os.path.join(os.path.expanduser("~"), "sc-disk") and "~" not in home
    assert not os.path.exists(os.path.join(os.getcwd(), "$SC_TEST_BASE"))


@pytest.mark.parametrize("text,expected", [
    ("1.5KiB", 1536), ("0.5MiB", 1 << 19), ("1.5GB", 1_500_000_000), ("2.25k", 2304), ("3", 3),
])
def test_fractional_sizes_with_a_unit_are_exact(text, expected):
    assert parse_size(text) == expected


def test_direct_tier_constructors_name_the_key_for_what_the_schema_refuses():
    from stratacache.backends.cpu import CpuTier
    from stratacache.backends.redis import RedisTier, RedisTierConfigError
    with pytest.raises(ValueError, match="tiers.cpu.capacity: an arena of"):
        CpuTier(1 << 62, pin_memory=False)
    for url in ("redis://localhost:99999", "redis://localhost/notanumber", "redis://:::@@/x"):
        with pytest.raises(RedisTierConfigError, match="tiers.redis.url"):
            RedisTier(url)


# -- issue 18: the models (pydantic v2) that replaced the hand-written validator.

def _sections():
    """(dotted prefix, Section class) for every section of the schema, the top level included."""
    out = []

    def walk(model, prefix):
        out.append((prefix, model))
        for name, field in model.model_fields.items():
            if section_type(field) is not None:
                walk(section_type(field), f"{prefix}{name}.")
    walk(ConfigModel, "")
    return out


def _nested(dotted, value):
    node = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    return node


@pytest.mark.parametrize("prefix,model", _sections(), ids=[p or "(top)" for p, _m in _sections()])
def test_unknown_key_in_every_section_suggests_the_closest(tmp_path, prefix, model):
    """A typo of each key of each section (a letter doubled at a random place) is refused,
    naming the typo's full path and the layer, and suggesting the key it was meant to be."""
    import random
    rng = random.Random(prefix)
    for name in model.model_fields:
        at = rng.randrange(len(name))
        typo = name[:at + 1] + name[at:]
        value = {} if section_type(model.model_fields[name]) is not None else 1
        path = write(tmp_path, yaml.safe_dump(_nested(prefix + typo, value)), f"{typo}.yaml")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        msg = str(info.value)
        assert msg.startswith(f"{prefix}{typo}: unknown key (in {path}); did you mean {prefix}{name}?"), msg
        with pytest.raises(ConfigError, match=f"did you mean {prefix}{name}\\?"):
            load_config(overrides={prefix + typo: value})


def test_unknown_key_far_from_any_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"telemetry.zzz": 1})
    assert str(info.value) == ("telemetry.zzz: unknown key (in overrides); valid keys here: prometheus, "
                               "host, port")


@pytest.mark.parametrize("key", ["tiers.cpu.capacity", "tiers.shared.capacity", "tiers.shared.prefault",
                                 "tiers.disk.capacity", "writeback.max_dirty_bytes", "namespaces.kv.quota"])
@pytest.mark.parametrize("size", ["4GiBs", "12 bytes", "3 QiB", "1.5 gigs", "GiB", "4 Gi B"])
def test_size_with_a_bad_unit_names_key_and_value(key, size):
    with pytest.raises(ConfigError) as info:
        load_config(overrides={key: size})
    msg = str(info.value)
    assert msg.startswith(f"{key}: expected a size like 4GiB"), msg
    assert repr(size) in msg and "(expected size (e.g. 4GiB)" in msg


def test_cross_field_rules_are_checked_on_the_merged_config(tmp_path):
    """A rule between keys holds for the merged config, whichever layers the keys come from."""
    raised = write(tmp_path, "writeback: {retry_backoff_s: 60}\n")        # above the default max, 10
    with pytest.raises(ConfigError) as info:
        load_config(raised)
    assert str(info.value) == "writeback.retry_backoff_max_s: must be >= writeback.retry_backoff_s"
    cfg = load_config(raised, overrides={"writeback.retry_backoff_max_s": 120})
    assert (cfg.writeback.retry_backoff_s, cfg.writeback.retry_backoff_max_s) == (60.0, 120.0)
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"tiers.redis.url": "rediss://cache.internal:6380/0"})
    assert str(info.value) == ("tiers.redis.tls: is false but tiers.redis.url uses rediss:// "
                               "(set tls: true)")
    assert load_config(overrides={"tiers.redis.url": "rediss://cache.internal:6380/0",
                                  "tiers.redis.tls": True}).tiers.redis.tls is True


def test_every_bad_value_is_reported_in_one_message():
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"tiers.disk.io_threads": 2.5, "telemetry.port": 0,
                               "connector.load_mode": "lazy"})
    assert str(info.value) == ("tiers.disk.io_threads: expected an integer, got float 2.5 (expected int); "
                               "telemetry.port: 0 is below the minimum 1 (expected int); "
                               "connector.load_mode: 'lazy' is not one of 'sync', 'async', 'layerwise'")


def test_structure_errors_name_the_layer_they_come_from(tmp_path):
    """A section given as a value in the file is reported for the file, even when the overrides
    would fill that section in."""
    path = write(tmp_path, "tiers: {cpu: 4GiB}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides={"tiers.cpu.capacity": "1GiB"})
    assert str(info.value) == "tiers.cpu: expected a mapping of keys, got str '4GiB'"


@pytest.mark.parametrize("key,value", [("tiers.cpu.pin_memory", 1), ("tiers.shared.register_cuda", 0),
                                       ("tiers.cpu.enabled", 1), ("lease_s", True), ("lease_s", ".inf"),
                                       ("tiers.redis.key_prefix", "  "), ("telemetry.host", 127)])
def test_values_are_never_coerced(key, value):
    """YAML's 1 is not true, a bool is not a number, a blank string is not a name."""
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(overrides={key: float("inf") if value == ".inf" else value})


def test_sections_keep_attribute_and_mapping_access():
    from collections.abc import Mapping
    cfg = load_config(overrides={"namespaces.params.quota": "1GiB"})
    assert cfg["tiers"]["cpu"] is cfg.tiers.cpu and isinstance(cfg.tiers.cpu, Mapping)
    assert list(cfg.namespaces) == ["kv", "params", "custom"]
    assert {k: cfg.namespaces[k].quota for k in cfg.namespaces} == {"kv": None, "params": 1 << 30,
                                                                     "custom": None}
    assert cfg.tiers.redis.get("write_policy", "write_through") == "write_through"   # not a key there
    assert cfg.tiers.redis.get("capacity") is None and "capacity" not in cfg.tiers.redis
    assert dict(cfg.telemetry) == {"prometheus": False, "host": "127.0.0.1", "port": 9464}
    with pytest.raises(KeyError, match="config has no key tiers.nvme"):
        cfg.tiers["nvme"]
    with pytest.raises(AttributeError, match="read-only"):
        cfg.namespaces.kv.priority = 3
    assert load_config() == load_config() and hash(load_config()) == hash(load_config())


def test_config_error_is_the_plane_s_config_error():
    from stratacache.core import errors
    assert ConfigError is errors.ConfigError
    assert issubclass(ConfigError, errors.InvalidArgument) and issubclass(ConfigError, ValueError)
    with pytest.raises(errors.InvalidArgument, match="^lease_s: "):
        load_config(overrides={"lease_s": "soon"})
