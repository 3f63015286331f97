"""ServerConfig from flags + env, and torch-free reading of the model repository."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnstack.contract import RepositoryError, check_report, parse_config, scan_repository, select_versions
from server.config import ServerConfig
from tests.server.helpers import config_pbtxt, publish, server_config, tiny_model


def test_every_flag_has_an_env_variable_and_the_command_line_wins() -> None:
    env = {
        "CNN_SERVE_REPOSITORY": "/models",
        "CNN_SERVE_HOST": "0.0.0.0",
        "CNN_SERVE_PORT": "9001",
        "CNN_SERVE_METRICS_PORT": "9002",
        "CNN_SERVE_DEVICE": "cpu",
        "CNN_SERVE_MAX_BATCH_SIZE": "32",
        "CNN_SERVE_MAX_QUEUE_DELAY_MS": "0.5",
        "CNN_SERVE_MAX_QUEUE_SIZE": "100",
        "CNN_SERVE_INSTANCES": "2",
        "CNN_SERVE_POLL_INTERVAL_S": "3",
        "CNN_SERVE_GRACE_S": "7",
        "CNN_SERVE_HTTP_PORT": "9000",
    }
    cfg = ServerConfig.from_args([], env)
    assert cfg == ServerConfig(
        repository=Path("/models"),
        host="0.0.0.0",
        port=9001,
        metrics_port=9002,
        device="cpu",
        max_batch_size=32,
        max_queue_delay_ms=0.5,
        max_queue_size=100,
        instances=2,
        poll_interval_s=3.0,
        grace_s=7.0,
        http_port=9000,
    )
    assert ServerConfig.from_args(["--max-batch-size", "8", "--port", "0"], env).max_batch_size == 8


def test_defaults_listen_on_loopback_8000_8001_8002_auto_device_no_tls(tmp_path) -> None:
    cfg = ServerConfig.from_args(["--repository", str(tmp_path)], {})
    assert (cfg.host, cfg.http_port, cfg.port, cfg.metrics_port, cfg.device) == (
        "127.0.0.1",
        8000,
        8001,
        8002,
        "auto",
    )
    assert not cfg.tls and cfg.tls_client_ca is None
    assert cfg.concurrent_rpc_limit >= cfg.max_queue_size


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "--repository is required"),
        (["--repository", "r", "--device", "tpu"], {}, "invalid choice: 'tpu'"),
        (["--repository", "r"], {"CNN_SERVE_DEVICE": "tpu"}, "--device must be one of"),
        (
            ["--repository", "r"],
            {"CNN_SERVE_MAX_QUEUE_SIZE": "lots"},
            "CNN_SERVE_MAX_QUEUE_SIZE='lots' is not a valid int",
        ),
        (["--repository", "r", "--instances", "0"], {}, "--instances must be >= 1"),
        (["--repository", "r", "--grace-s", "-1"], {}, "--grace-s must be >= 0"),
        (["--repository", "r", "--http-port", "-2"], {}, "--http-port must be in [0, 65535] (-1 disables)"),
        (["--repository", "r", "--tls-cert", "c.pem"], {}, "--tls-cert and --tls-key go together"),
        (["--repository", "r"], {"CNN_SERVE_TLS_KEY": "k.pem"}, "--tls-cert and --tls-key go together"),
        (["--repository", "r", "--tls-client-ca", "ca.pem"], {}, "--tls-client-ca needs --tls-cert"),
        (
            ["--repository", "r", "--tls-cert", "nope.pem", "--tls-key", "nope.pem"],
            {},
            "--tls-cert nope.pem is not a readable file",
        ),
    ],
)
def test_bad_settings_are_refused_with_the_flag_named(argv, env, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        ServerConfig.from_args(argv, env)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_config_reads_the_exporters_config_and_skips_unknown_fields() -> None:
    text = config_pbtxt("lenet", (1, 28, 28), 10, max_batch_size=16, max_queue_delay_us=500, num_versions=2)
    text += 'model_warmup [ { name: "w" batch_size: 1 } ]\noptimization { graph { level: 1 } }\n'
    config = parse_config(text)
    assert (
        config.name == "lenet" and config.max_batch_size == 16 and list(config.input[0].dims) == [1, 28, 28]
    )
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.version_policy.latest.num_versions == 2
    with pytest.raises(RepositoryError, match="config.pbtxt: not a valid ModelConfig"):
        parse_config("max_batch_size: {")
    with pytest.raises(RepositoryError, match="platform 'tensorrt_plan' is not served here"):
        parse_config('platform: "tensorrt_plan"')


def test_version_policies() -> None:
    available = [1, 2, 5, 9]
    assert select_versions(parse_config(""), available) == [9]
    assert select_versions(parse_config("version_policy: { latest { num_versions: 2 } }"), available) == [
        5,
        9,
    ]
    assert select_versions(parse_config("version_policy: { all { } }"), available) == available
    assert select_versions(
        parse_config("version_policy: { specific { versions: [2, 9, 11] } }"), available
    ) == [2, 9]


def test_scan_sees_only_published_versions(tmp_path) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    (root / ".tmp-tiny-abc").mkdir()  # an export in progress
    (root / ".tmp-tiny-abc" / "model.onnx").write_bytes(data)
    for odd in ("02", "latest", "3"):  # "0"-prefixed and non-numeric are not versions; 3 has no model yet
        (root / "tiny" / odd).mkdir()
    (root / "README.md").write_text("not a model")
    models = scan_repository(root)
    assert list(models) == ["tiny"] and list(models["tiny"].versions) == [1]
    assert models["tiny"].config.max_batch_size == 64
    with pytest.raises(RepositoryError, match="does not exist"):
        scan_repository(tmp_path / "missing")


def test_export_report_must_say_passed(tmp_path) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    files = scan_repository(root)["tiny"].versions[1]
    assert check_report(files)["passed"] is True
    files.report_path.write_text(json.dumps({"passed": False, "failure": "max abs diff 0.2"}))
    with pytest.raises(RepositoryError, match=r"did not pass its checks \(passed=False, max abs diff 0.2\)"):
        check_report(files)
    files.report_path.write_text("{not json")
    with pytest.raises(RepositoryError, match="not valid JSON"):
        check_report(files)
    files.report_path.unlink()  # a hand-made repository: served, with a warning
    assert check_report(files) is None


@pytest.mark.integration
def test_a_models_config_can_lower_the_server_ceilings(tmp_path, start_server) -> None:
    import tritonclient.grpc as tc

    root = tmp_path / "repo"
    data, tm = tiny_model()
    cfg = config_pbtxt("tiny", (1, 28, 28), 10, max_batch_size=4, max_queue_delay_us=100_000)
    cfg += "instance_group [ { count: 2 kind: KIND_CPU } ]\n"
    publish(root, "tiny", 1, data, tm.meta, config=cfg)
    server = start_server(server_config(root, max_batch_size=64, max_queue_delay_ms=1.0))
    config = tc.InferenceServerClient(server.target).get_model_config("tiny").config
    assert config.max_batch_size == 4  # min(server 64, model 4)
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000  # min(server 1 ms, model 100 ms)
    assert config.instance_group[0].count == 2
    served = server.handle.manager.resolve("tiny")
    assert len(served.instances) == 2 and served.max_batch_size == 4


@pytest.mark.integration
def test_only_models_faster_than_a_thread_hop_run_inline(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    fast, tm = tiny_model()  # far below a thread hop per batch
    slow, tm_slow = tiny_model(hidden=300, width=1024)  # far above it, per image
    publish(root, "fast", 1, fast, tm.meta)
    publish(root, "slow", 1, slow, tm_slow.meta)
    server = start_server(server_config(root, max_batch_size=8))
    manager = server.handle.manager
    assert manager.resolve("fast").batchers[0].inline_max_images >= 1
    assert manager.resolve("slow").batchers[0].inline_max_images == 0
    # Inline runs, and the batches the load-time timing found no slower on one thread, get a second,
    # single-threaded session where the main one has several threads; it exists only for them.
    x = np.random.default_rng(0).random((3, *tm.meta.input_shape), dtype=np.float32)
    for served in (manager.resolve("fast"), manager.resolve("slow")):
        inst, batcher = served.instances[0], served.batchers[0]
        used = batcher.inline_max_images > 0 or batcher.solo_max_images > 0
        if inst.session.get_session_options().intra_op_num_threads == 1:
            assert inst.solo is None and batcher.solo_max_images == 0
            continue
        assert (inst.solo is not None) == used
        if inst.solo is not None:
            assert inst.solo.get_session_options().intra_op_num_threads == 1
            for a, b in zip(inst.run(x), inst.run(x, solo=True), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    off = start_server(server_config(root, inline_compute_us=0))
    off_fast = off.handle.manager.resolve("fast")
    assert off_fast.batchers[0].inline_max_images == 0
    assert (off_fast.instances[0].solo is None) == (off_fast.batchers[0].solo_max_images == 0)
