// The API's interactive documentation at /docs: Swagger UI 5.35.0 (swagger-ui-dist, Apache
// 2.0: /static/swagger-ui-LICENSE.txt), shipped in the wheel and served from this origin.
// A file rather than an inline script, so the page's policy can forbid inline scripts.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  // No call to swagger.io's online validator, and no ?url= that shows another document.
  validatorUrl: "none",
  queryConfigEnabled: false,
});
