"""Pipeline serving: profiles, simulator, planner and tuner as in InferLine (not built yet)."""
