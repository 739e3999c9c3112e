"""``fixres report``: rebuild the HTML report of a ``fixres fix`` run folder from its JSON."""

from __future__ import annotations

from fixres.config import default_out


def add_parser(sub, parents):
    p = sub.add_parser("report", parents=parents, help="rebuild the HTML report of a run folder",
                       description="Rebuild RUN_DIR/report/index.html (self-contained: images inline) and its "
                                   "PNGs and report.json from the JSON results a `fixres fix` run left in RUN_DIR.")
    p.add_argument("run_dir", nargs="?", default=default_out("fix"), metavar="RUN_DIR",
                   help=f"default {default_out('fix')}")
    return p


def run(args):
    from fixres.job.headline import write_run_report
    summary = write_run_report(args.run_dir)
    return summary, f"report: {summary['html']}"
