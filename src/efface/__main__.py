from efface.cli import main

raise SystemExit(main())
