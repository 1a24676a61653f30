"""`mergeline run`: the DAG over Ray, caching, recovery, publishing."""
