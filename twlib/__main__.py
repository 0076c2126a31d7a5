from twlib.cli import main

raise SystemExit(main())
