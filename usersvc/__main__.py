from usersvc.cli import main

raise SystemExit(main())
