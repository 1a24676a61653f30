"""The work each stage runs inside Ray: reads inputs from the store, writes outputs back."""
