"""Labels and the session's high-water mark: the "no write down" property for agent tools."""
