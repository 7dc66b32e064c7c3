"""Everything that measures rather than serves: `clipbank bench serve | soak` (load generator, baseline server,
server processes, report and plot writers), FLOP counting and synthetic bundles. It imports the product
packages; none of them imports it."""
