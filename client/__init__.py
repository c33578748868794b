"""The device SDK: event store, consent, local training, update guard, privacy ledger and the Flower ClientApp (see DESIGN.md)."""
