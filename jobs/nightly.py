"""Entry point for a scheduled render: `python jobs/nightly.py CONFIG [key=value ...] [--date YYYY-MM-DD]`.

The run id is the day (nightly.run_id_format in nightly.timezone), so a repeated trigger resumes
that day's run or, when it is complete, exits 0 without rendering. Exit codes: 0 done,
1 shards failed (trigger again to retry), 2 configuration or input error, 3 another driver holds
the night's run lock (or took it over from this one).
"""
import sys

from cogview_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
