"""The run plumbing every command shares: options, preflight checks, the output folder, the manifest, progress."""
