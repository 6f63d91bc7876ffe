//! The `tandem` command: admin commands (topics, publish, consume,
//! transactions) and `tandem demo`.
