from handclip.cli import main

raise SystemExit(main())
