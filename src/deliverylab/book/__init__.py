"""What only the book uses: the seeded lab scenario, its views and panel, the trace's
pictures, and each chapter's experiments (some wrong on purpose)."""
