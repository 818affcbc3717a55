"""inventory.Inventory: stock per SKU and reservations per order."""
