"""``python -m trainers.demo``: the training half of ``make demo`` (:mod:`trainers.demo.code_demo`)."""

from trainers.demo.code_demo import main

raise SystemExit(main())
