from nonstop.cli import main

raise SystemExit(main())
