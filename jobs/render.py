"""Entry point for `ray job submit --working-dir . -- python jobs/render.py CONFIG [key=value ...]`.

Joins the cluster in RAY_ADDRESS (set by the job server), or starts a local Ray when there is none.
"""
import sys

from cogview_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["render", *sys.argv[1:]]))
