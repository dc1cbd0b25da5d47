"""The native sharded data-parallel engine: flat-buffer layout, overlapped gradient sync, ZeRO stages 0-2."""
