"""``cnn-export`` / ``python -m exporter``: batch export into a Triton model repository.

    cnn-export runs/lenet runs/resnet18 --repository models --int8 --fp16
    cnn-export verify models/lenet/1 --checkpoint runs/lenet/best.pt

Exit status: 0 when everything asked for was published (or verified), 1 when any source failed,
2 on usage errors.
"""

from __future__ import annotations

import json
import sys

from cnnstack.contract import FAILED_DIR, RepositoryError, ensure_writable, write_failed_report, write_summary
from exporter.config import ExportConfig, parse_config
from exporter.report import summary_document, summary_row, text_table


def _err(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # keeps the progress bar intact


def export_all(cfg: ExportConfig) -> int:
    from tqdm import tqdm

    from exporter.driver import ExportFailed, export_one
    from exporter.source import BadInput

    assert cfg.repository is not None
    try:
        repo = ensure_writable(cfg.repository)
    except RepositoryError as e:
        _err(f"cnn-export: {e}")
        return 1
    rows, failures = [], 0
    # A bar only on a terminal: in a log file its redraws are noise; the step lines say the same.
    show = cfg.progress and sys.stderr.isatty()
    bar = tqdm(cfg.sources, desc="export", unit="model", disable=not show, file=sys.stderr)
    for given in bar:
        bar.set_postfix_str(given.name)
        try:
            result = export_one(given, cfg)
        except BadInput as e:
            failures += 1
            _err(f"cnn-export: {given}: bad input: {str(e).splitlines()[0]}")
            rows.append(summary_row(str(given), None, None, {}, f"bad input: {e}"[:200]))
            continue
        except ExportFailed as e:
            failures += 1
            where = write_failed_report(cfg.report_dir or repo / FAILED_DIR, e.report.name, e.report)
            _err(f"cnn-export: {given}: FAILED check '{e.check}': {e}\n  nothing published; report: {where}")
            rows.append(summary_row(str(given), e.report.name, e.report, {}, f"failed: {e.check}"))
            continue
        status = "ok" if not result.problems else "; ".join(result.problems)
        if result.problems:
            failures += 1
            for problem in result.problems:
                _err(f"cnn-export: {given}: {problem}")
        versions = ", ".join(f"{n}/{v}" for n, v in result.published.items())
        bar.write(f"published {versions} from {given}", file=sys.stderr)
        rows.append(summary_row(str(given), result.name, result.report, result.published, status))
    bar.close()

    print(text_table(rows))
    if any(row["published"] for row in rows):
        doc, markdown = summary_document(rows, failures)
        json_path, md_path = write_summary(repo, doc, markdown)
        print(f"\nsummary: {json_path} {md_path}; {len(rows) - failures} ok, {failures} failed")
    else:  # nothing was published: leave the repository as it was
        print(f"\nnothing published; {failures} failed")
    return 1 if failures else 0


def verify(cfg: ExportConfig) -> int:
    from exporter.source import BadInput
    from exporter.verify import verify_published

    try:
        report = verify_published(cfg)
    except BadInput as e:
        _err(f"cnn-export verify: bad input: {e}")
        return 1
    print(json.dumps(report, indent=2, sort_keys=True))
    if not report["passed"]:
        _err(f"cnn-export verify: FAILED check '{report['failed_check']}' on {cfg.sources[0]}")
        return 1
    _err(f"cnn-export verify: {cfg.sources[0]} passed: " + "; ".join(c["message"] for c in report["checks"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(list(sys.argv[1:] if argv is None else argv))
    if not cfg.threads:
        return verify(cfg) if cfg.command == "verify" else export_all(cfg)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return verify(cfg) if cfg.command == "verify" else export_all(cfg)
    finally:
        torch.set_num_threads(before)  # main() may run inside a longer-lived process (tests)


if __name__ == "__main__":
    sys.exit(main())
