"""The Quart web application: kiosk, nurse, provider and admin UIs, health and metrics."""
