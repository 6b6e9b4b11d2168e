"""Static report: `python run_report.py --config.exp_name demo` writes data/demo/report/index.html.

`--config.report.watch=True` keeps updating it until the sampler has finished; rerunning redraws only
what changed.
"""

from d_fusion.cli import main
from d_fusion.report import run_report

if __name__ == "__main__":
    main(run_report)
