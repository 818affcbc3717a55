"""payment.Payment: customer balances, merchant takings and a ledger (cents)."""
