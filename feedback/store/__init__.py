"""The feedback store, torch-free: tables, migrations' models, service functions by domain, pairs, export."""
