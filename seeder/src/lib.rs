//! Seeder server: seeds every shard with librqbit, runs the HTTP tracker and web seed (next issue).
