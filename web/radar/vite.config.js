// Builds the Radar page into dist/, which the gateway serves with
// --static-dir. Relative asset paths keep the page working under any prefix.
import { defineConfig } from 'vite';

export default defineConfig({
  base: './',
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2022',
    // cytoscape is one large module; splitting it gains nothing here.
    chunkSizeWarningLimit: 1024,
  },
});
