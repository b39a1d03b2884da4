"""``python -m training.region_captions``: the region paper's offline caption step (see
:mod:`training.regions.captions`)."""

from training.regions.captions import main

if __name__ == "__main__":
    raise SystemExit(main())
