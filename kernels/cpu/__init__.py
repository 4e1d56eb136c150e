"""The CPU tile backend of 3DNA (pure torch; also serves ``backend="torch"`` on other devices).

planner (tile shape, geometry, window masks, ``CpuConfig``) -> layout (tile and
strip layouts) -> forward / backward (the loops) -> op (the custom ops);
workers (threads) and workspace (scratch kept between calls) serve them.
"""
