"""jobs: run configs, the sweep planner, launchers and cluster manifests."""
