from pleaco.cli import main

raise SystemExit(main())
