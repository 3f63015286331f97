"""``cnn-tune``: the serving settings that give one model the most throughput within a latency SLO,
measured where it runs, and the winner written into its config.pbtxt.

    cnn-tune --repository artifacts/repository --model fmnist --latency-threshold 10 --budget-s 300
    cnn-tune --target 10.0.0.5:8001 --model fmnist --latency-threshold 10      # a running server

With ``--repository`` it starts cnn-serve itself (explicit model control, ceilings above every
candidate) and searches max_batch_size, max_queue_delay, the instance count, ``--workers`` (a
restart) and the published fp16/int8 variants; the winner's batching and instances go into that
model's config.pbtxt (``--no-write``: not). With ``--target`` it tunes a server that runs
``--model-control-mode explicit`` through the repository API: only what a load's config can
change (no ``--workers``, nothing written). Every candidate is measured by cnn-loadtest's capacity
search (closed loop, KServe v2 over gRPC); the report has every candidate, the gain over the
defaults measured in the same run, and with ``--plot`` a throughput-against-latency picture with
the Pareto front.

Exit status: 0 tuned (the report says whether anything met the SLO), 1 the server or model could
not be used, 2 bad command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnstack.cli import parse_config, require
from cnnstack.contract import CONFIG_FILE, atomic_write_text, render_config
from cnnstack.contract import parse_config as read_config
from loadtest.config import LoadTestConfig, read_token
from loadtest.session import capacity
from loadtest.stats import percentile_key
from loadtest.tuning import Settings, Space, Trial, Tuner, describe_effective, pareto
from protos.inference import model_config_pb2 as mc


@dataclass(frozen=True)
class TuneConfig:
    model: str
    latency_threshold_ms: float
    repository: Path | None = None
    target: str | None = None
    percentile: float = 99.0
    images_per_request: int = 1
    search: str = "quick"
    budget_s: float = 300.0
    max_batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32, 64, 128)
    queue_delays_us: tuple[int, ...] = (0, 500, 1000, 2000, 5000)
    instances: tuple[int, ...] = (1, 2)
    workers: tuple[int, ...] = (1, 2)
    variants: str = "auto"  # auto: the published NAME-fp16 and NAME-int8; none; or e.g. "fp16"
    concurrency: tuple[int, int] = (1, 256)
    duration_s: float = 8.0
    window_s: float = 1.0
    warmup_s: float = 1.0
    device: str = "auto"
    auth_token_file: Path | None = None
    out: Path = Path("tune-report.json")
    plot: Path | None = None
    write: bool = True

    def __post_init__(self) -> None:
        require(self.problems())

    def problems(self) -> list[str]:
        checks = [
            (
                (self.repository is None) != (self.target is None),
                "give --repository (start a server) or --target, one",
            ),
            (self.latency_threshold_ms > 0, "--latency-threshold must be > 0 (ms)"),
            (self.search in ("quick", "brute"), f"--search must be quick or brute, got {self.search!r}"),
            (self.budget_s > 0, "--budget-s must be > 0"),
            (self.images_per_request >= 1, "--images-per-request must be >= 1"),
            (
                all(v >= 1 for v in (*self.max_batch_sizes, *self.instances, *self.workers)),
                "batch sizes, instances and workers must be >= 1",
            ),
            (all(v >= 0 for v in self.queue_delays_us), "--queue-delays-us must be >= 0"),
            (
                len(self.concurrency) == 2 and 1 <= self.concurrency[0] < self.concurrency[1],
                "--concurrency is LO,HI with 1 <= LO < HI",
            ),
            (
                self.repository is None or (self.repository / self.model / CONFIG_FILE).is_file(),
                f"no {self.model}/{CONFIG_FILE} in --repository {self.repository}",
            ),
        ]
        return [message for ok, message in checks if not ok]


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnn-tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument(
        "--latency-threshold", dest="latency_threshold_ms", type=float, required=True, metavar="MS"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--repository", type=Path, help="start cnn-serve on this repository (everything searchable)"
    )
    where.add_argument("--target", help="HOST:PORT of a running cnn-serve --model-control-mode explicit")
    p.add_argument("--percentile", type=float, default=99.0)
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--search", default="quick", choices=("quick", "brute"))
    p.add_argument("--budget-s", type=float, default=300.0, help="the whole tuning run")
    d = TuneConfig(model="", latency_threshold_ms=1.0, target="x")
    p.add_argument("--max-batch-sizes", type=ints, default=d.max_batch_sizes)
    p.add_argument("--queue-delays-us", type=ints, default=d.queue_delays_us)
    p.add_argument("--instances", type=ints, default=d.instances)
    p.add_argument("--workers", type=ints, default=d.workers, help="--repository only (a restart per value)")
    p.add_argument(
        "--variants", default="auto", help="auto (the published NAME-fp16, NAME-int8), none, or a list"
    )
    p.add_argument("--concurrency", type=ints, default=d.concurrency, help="the capacity search's LO,HI")
    p.add_argument(
        "--duration", dest="duration_s", type=float, default=d.duration_s, help="per probe, at most"
    )
    p.add_argument("--window", dest="window_s", type=float, default=d.window_s)
    p.add_argument("--warmup", dest="warmup_s", type=float, default=d.warmup_s)
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="--repository: cnn-serve's"
    )
    p.add_argument(
        "--auth-token-file", type=Path, help="a token the server takes for inference and model control"
    )
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--plot", type=Path)
    p.add_argument("--no-write", dest="write", action="store_false", help="leave config.pbtxt as it is")
    return p


# ---------------------------------------------------------------- the server under test


class Server:
    """The server the candidates run on: one cnn-serve started here (restarted for --workers), or
    the one at --target. ``apply`` loads a candidate's config through model control."""

    def __init__(self, cfg: TuneConfig) -> None:
        self.cfg = cfg
        self.proc: Any = None  # a cnnstack.serverproc.ServerProcess once started here
        self.workers = 0
        self.target = cfg.target or ""
        token = read_token(cfg.auth_token_file) if cfg.auth_token_file else None
        self.headers = {"authorization": f"Bearer {token}"} if token else None

    def client(self):  # noqa: ANN201 - tritonclient.grpc.InferenceServerClient
        import tritonclient.grpc as tg

        return tg.InferenceServerClient(self.target)

    def base_config(self, model: str) -> mc.ModelConfig:
        if self.cfg.repository is not None:
            return read_config((self.cfg.repository / model / CONFIG_FILE).read_text())
        return self.client().get_model_config(model, headers=self.headers).config

    def start(self, workers: int, space: Space) -> None:
        if self.cfg.repository is None or workers == self.workers:
            return
        from cnnstack.serverproc import ServerProcess

        self.stop()
        ceilings = [
            "--max-batch-size",
            str(max(space.max_batch_size)),
            "--max-queue-delay-ms",
            str(max(space.max_queue_delay_us) / 1000 + 1),
            "--max-queue-size",
            "1024",
            "--metrics-port",
            "-1",
            "--device",
            self.cfg.device,
            "--model-control-mode",
            "explicit",
            "--workers",
            str(workers),
        ]
        self.proc = ServerProcess(*ceilings, repository=self.cfg.repository)
        self.proc.start()
        self.target, self.workers = self.proc.target, workers

    def apply(self, s: Settings, base: mc.ModelConfig) -> dict:
        """Load the candidate's config; returns what the server then runs of it."""
        model = s.model(self.cfg.model)
        client = self.client()
        client.load_model(model, config=s.config_json(base), headers=self.headers)
        return describe_effective(client.get_model_config(model, headers=self.headers).config)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


def measure_with(cfg: TuneConfig, server: Server, space: Space, bases: dict[str, mc.ModelConfig]):
    """The Tuner's measure: apply a candidate, then search its capacity within the time left."""

    def measure(s: Settings, seconds: float) -> Trial:
        t0 = time.monotonic()
        model = s.model(cfg.model)
        try:
            server.start(s.workers, space)
            effective = server.apply(s, bases[model])
            lt = LoadTestConfig(
                target=server.target,
                model=model,
                api="kserve",
                concurrency=cfg.concurrency,
                images_per_request=cfg.images_per_request,
                latency_threshold_ms=cfg.latency_threshold_ms,
                percentile=cfg.percentile,
                duration_s=cfg.duration_s,
                window_s=cfg.window_s,
                warmup_s=cfg.warmup_s,
                search_budget_s=max(seconds, 1.0),
                quiet=True,
                auth_token_file=cfg.auth_token_file,
            )
            return Trial(s, capacity(lt), time.monotonic() - t0, effective=effective)
        except Exception as e:  # a candidate the server refuses is a result, not the end of the run
            return Trial(s, None, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")

    return measure


# ---------------------------------------------------------------- the run


def variants_of(cfg: TuneConfig) -> tuple[str, ...]:
    if cfg.variants == "none":
        return ("",)
    asked = ("fp16", "int8") if cfg.variants == "auto" else tuple(v for v in cfg.variants.split(",") if v)
    if cfg.repository is None:
        return ("", *asked) if cfg.variants != "auto" else ("",)
    return ("", *(v for v in asked if (cfg.repository / f"{cfg.model}-{v}" / CONFIG_FILE).is_file()))


def defaults_of(base: mc.ModelConfig) -> Settings:
    groups = sum(g.count for g in base.instance_group) or 1
    return Settings(base.max_batch_size or 64, base.dynamic_batching.max_queue_delay_microseconds, groups)


def space_of(cfg: TuneConfig, default: Settings) -> Space:
    def with_default(values: Sequence, value) -> tuple:  # noqa: ANN001
        return tuple(sorted({*values, value}))

    return Space(
        max_batch_size=with_default(cfg.max_batch_sizes, default.max_batch_size),
        max_queue_delay_us=with_default(cfg.queue_delays_us, default.max_queue_delay_us),
        instances=with_default(cfg.instances, default.instances),
        workers=with_default(cfg.workers, 1) if cfg.repository is not None else (1,),
        variant=variants_of(cfg),
    )


def show(trial: Trial, percentile: str) -> None:
    knee = trial.result.knee if trial.result is not None else None
    at = (
        f"{knee.result.latency_ms.get(percentile, float('nan')):7.2f} ms at {knee.result.label}"
        if knee
        else "    nothing met the SLO"
    )
    extra = f"  ({trial.error})" if trial.error else ""
    print(
        f"{trial.settings.label():<52} {trial.score:10.1f} req/s {at}  [{trial.seconds:.0f} s]{extra}",
        flush=True,
    )


def write_winner(cfg: TuneConfig, winner: Settings, base: mc.ModelConfig) -> Path:
    path = cfg.repository / winner.model(cfg.model) / CONFIG_FILE  # type: ignore[operator]
    atomic_write_text(path, render_config(winner.config(base)))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(TuneConfig, build_parser(), argv)
    server = Server(cfg)
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        try:
            bases = {
                m: server.base_config(m)
                for m in (Settings(1, 0, variant=v).model(cfg.model) for v in variants_of(cfg))
            }
            default = defaults_of(bases[cfg.model])
            space = space_of(cfg, default)
            # Started with the space's ceilings: the server's flags cap what a loaded config asks.
            server.start(default.workers, space)
        except Exception as e:
            print(f"cnn-tune: cannot use the server or model: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        percentile = percentile_key(cfg.percentile)
        print(
            f"cnn-tune {cfg.model}: p{cfg.percentile:g} <= {cfg.latency_threshold_ms:g} ms, "
            f"{cfg.search} search of {space.size()} candidates within {cfg.budget_s:g} s; defaults: {default.label()}"
        )
        tuner = Tuner(
            space,
            default,
            measure_with(cfg, server, space, bases),
            cfg.budget_s,
            lambda t: show(t, percentile),
        )
        winner = tuner.quick() if cfg.search == "quick" else tuner.brute()
    return report(cfg, tuner, winner, bases, percentile)


def report(
    cfg: TuneConfig, tuner: Tuner, winner: Trial, bases: dict[str, mc.ModelConfig], percentile: str
) -> int:
    trials = sorted(tuner.trials.values(), key=lambda t: -t.score)
    base = tuner.trials[tuner.default]
    print(f"\n{'candidate':<52} {'req/s at SLO':>12} {'images/s':>10}")
    for t in trials:
        mark = " <- winner" if t is winner else (" (defaults)" if t is base else "")
        print(f"{t.settings.label():<52} {t.score:12.1f} {t.images_per_s:10.1f}{mark}")
    if tuner.stopped_by_budget:
        print(
            f"(stopped by --budget-s {cfg.budget_s:g}: {len(trials)} of {tuner.space.size()} candidates measured)"
        )
    gain = winner.score / base.score if base.score else float("inf") if winner.score else 1.0
    print(
        f"winner: {winner.settings.label()}: {winner.score:.1f} req/s against {base.score:.1f} with the defaults ({gain:.2f}x)"
    )
    written = None
    if winner.score and cfg.write and cfg.repository is not None and winner.settings != tuner.default:
        written = write_winner(cfg, winner.settings, bases[winner.settings.model(cfg.model)])
        print(
            f"written: {written}"
            + (f"; serve with --workers {winner.settings.workers}" if winner.settings.workers > 1 else "")
        )
    doc = {
        "model": cfg.model,
        "threshold_ms": cfg.latency_threshold_ms,
        "percentile": cfg.percentile,
        "search": cfg.search,
        "space_size": tuner.space.size(),
        "budget_s": cfg.budget_s,
        "stopped_by_budget": tuner.stopped_by_budget,
        "default": base.to_dict(),
        "winner": winner.to_dict(),
        "gain": gain,
        "written": str(written) if written else None,
        "candidates": [t.to_dict() for t in trials],
    }
    cfg.out.write_text(json.dumps(doc, indent=2))
    if cfg.plot is not None:
        plot(trials, winner, percentile, cfg)
    return 0


def plot(trials: list[Trial], winner: Trial, percentile: str, cfg: TuneConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def latency(t: Trial) -> float:
        knee = t.result.knee if t.result is not None else None
        return knee.result.latency_ms.get(percentile, float("nan")) if knee else float("nan")

    fig, ax = plt.subplots(figsize=(8, 5))
    for t in trials:
        if t.result is None:
            continue
        pts = sorted(
            (p.result.requests_per_s, p.result.latency_ms.get(percentile, float("nan")))
            for p in t.result.probes
        )
        ax.plot(
            [x for x, _ in pts],
            [y for _, y in pts],
            ".-",
            alpha=0.35,
            label=t.settings.label() if t is winner else None,
        )
    front = sorted(pareto(trials, latency), key=lambda t: t.score)
    ax.plot(
        [t.score for t in front],
        [latency(t) for t in front],
        "o-",
        color="black",
        label="Pareto front (knees)",
    )
    ax.axhline(cfg.latency_threshold_ms, color="red", linestyle="--", label=f"p{cfg.percentile:g} threshold")
    ax.set_xlabel("requests/s")
    ax.set_ylabel(f"p{cfg.percentile:g} latency (ms)")
    ax.set_title(f"cnn-tune {cfg.model}: every candidate's probes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(cfg.plot), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
