"""The evaluation DAG: which evaluations each checkpoint gets, and the ledger of submissions."""
