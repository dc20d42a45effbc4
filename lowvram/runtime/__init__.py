"""What a run decides and how it is applied: profiles, the planner, the engine, block streaming, KV caches, the schedule."""
