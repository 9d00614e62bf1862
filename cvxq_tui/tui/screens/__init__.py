"""One screen per module: start (options), layers, run, results, help, dialogs."""
