"""PostgreSQL access for reports (bounces, complaints, delays): recording one with its
effects, finding the delivery a token names, listing and reading them back."""
