"""Optimizer update rules over shard pieces (SGD ... LAMB, Shampoo) and the name -> rule registry."""
