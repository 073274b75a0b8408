from tdproxy.cli import main

raise SystemExit(main())
